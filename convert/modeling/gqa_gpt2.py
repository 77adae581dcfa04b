"""GPT-2 with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G heads.

Written by gqa-toolkit into every converted GPT-2 directory and loaded from there with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Self-contained: imports torch and transformers
only. `c_attn` is a Conv1D `[d, (H + 2G) * hd]` whose columns are `[q (H*hd) | k (G*hd) | v (G*hd)]`; query head h
uses KV head h // (H/G). Cross-attention (`add_cross_attention`) is not supported.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2LMHeadModel, eager_attention_forward
from transformers.pytorch_utils import Conv1D


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, T, hd) -> (B, G * n_rep, T, hd): KV head j serves query heads j*n_rep .. (j+1)*n_rep - 1."""
    if n_rep == 1:
        return x
    B, G, T, hd = x.shape
    return x[:, :, None].expand(B, G, n_rep, T, hd).reshape(B, G * n_rep, T, hd)


class GQAGPT2Config(GPT2Config):
    model_type = "gqa_gpt2"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQAGPT2Attention(GPT2Attention):
    def __init__(self, config, is_cross_attention=False, layer_idx=None):
        if is_cross_attention:
            raise ValueError("gqa_gpt2 supports self-attention only; this config has add_cross_attention=True")
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        self.num_key_value_heads = config.num_key_value_heads or self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} does not divide n_head={self.num_heads}")
        # read by transformers' sdpa and flash attention, which share each K/V head among its query heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.kv_dim = self.num_key_value_heads * self.head_dim
        self.c_attn = Conv1D(self.embed_dim + 2 * self.kv_dim, self.embed_dim)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("gqa_gpt2 supports self-attention only")
        q, k, v = self.c_attn(hidden_states).split([self.embed_dim, self.kv_dim, self.kv_dim], dim=2)
        q = q.view(*q.shape[:-1], -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(*k.shape[:-1], -1, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        v = v.view(*v.shape[:-1], -1, self.head_dim).transpose(1, 2)  # (B, G, T, hd)

        if past_key_values is not None:
            cache = (past_key_values.self_attention_cache if isinstance(past_key_values, EncoderDecoderCache)
                     else past_key_values)
            k, v = cache.update(k, v, self.layer_idx)  # the cache holds G heads
        if self.config._attn_implementation == "eager":  # the stock eager attention wants H K/V heads
            k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)  # (B, H, T, hd)

        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            out, weights = self._upcast_and_reordered_attn(q, k, v, attention_mask)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                              eager_attention_forward)
            out, weights = attention(self, q, k, v, attention_mask, dropout=self.attn_dropout.p if self.training
                                     else 0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(*out.shape[:-2], -1).contiguous()  # (B, T, H*hd)
        return self.resid_dropout(self.c_proj(out)), weights


class GQAGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = GQAGPT2Config

    def __init__(self, config: GQAGPT2Config):
        super().__init__(config)
        for i, block in enumerate(self.transformer.h):
            block.attn = GQAGPT2Attention(config, layer_idx=i)
        self.post_init()


# save_pretrained copies this file next to the weights and writes auto_map, so saved checkpoints (after uptraining,
# say) load with trust_remote_code=True just as converted ones do.
GQAGPT2Config.register_for_auto_class()
GQAGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")
