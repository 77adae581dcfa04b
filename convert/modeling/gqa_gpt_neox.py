"""GPT-NeoX (Pythia) with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G.

Written by gqa-toolkit into every converted GPT-NeoX directory and loaded from there with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Self-contained: imports torch and transformers
only. `query_key_value` is fused per group: rows `[G, (q * H/G, k, v), hd]`, which for G = H is the stock
per-head layout `[H, (q, k, v), hd]`. Query head h uses KV head h // (H/G).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import (GPTNeoXAttention, GPTNeoXForCausalLM,
                                                            apply_rotary_pos_emb, eager_attention_forward)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, T, hd) -> (B, G * n_rep, T, hd): KV head j serves query heads j*n_rep .. (j+1)*n_rep - 1."""
    if n_rep == 1:
        return x
    B, G, T, hd = x.shape
    return x[:, :, None].expand(B, G, n_rep, T, hd).reshape(B, G * n_rep, T, hd)


class GQAGPTNeoXConfig(GPTNeoXConfig):
    model_type = "gqa_gpt_neox"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQAGPTNeoXAttention(GPTNeoXAttention):
    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads or self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} does not divide "
                             f"num_attention_heads={self.num_heads}")
        # read by transformers' sdpa and flash attention, which share each K/V head among its query heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        rows = (self.num_heads + 2 * self.num_key_value_heads) * self.head_size
        self.query_key_value = nn.Linear(config.hidden_size, rows, bias=config.attention_bias)

    def forward(self, hidden_states, attention_mask, layer_past=None, position_embeddings=None, **kwargs):
        input_shape = hidden_states.shape[:-1]  # (B, T)
        per_group = self.num_key_value_groups
        qkv = self.query_key_value(hidden_states)
        qkv = qkv.view(*input_shape, self.num_key_value_heads, per_group + 2, self.head_size)  # (B, T, G, H/G+2, hd)
        q = qkv[..., :per_group, :].reshape(*input_shape, self.num_heads, self.head_size).transpose(1, 2)  # (B,H,T,hd)
        k = qkv[..., per_group, :].transpose(1, 2)  # (B, G, T, hd)
        v = qkv[..., per_group + 1, :].transpose(1, 2)  # (B, G, T, hd)

        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_idx)  # the cache holds G heads
        if self.config._attn_implementation == "eager":  # the stock eager attention wants H K/V heads
            k, v = repeat_kv(k, per_group), repeat_kv(v, per_group)  # (B, H, T, hd)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()  # (B, T, H*hd)
        return self.dense(out), weights


class GQAGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    config_class = GQAGPTNeoXConfig
    # transformers skips its own checkpoint renames for code outside the library; GPT-NeoX checkpoints name the LM
    # head `embed_out` on disk, so the rename is registered for this class explicitly (below).

    def __init__(self, config: GQAGPTNeoXConfig):
        super().__init__(config)
        for i, layer in enumerate(self.gpt_neox.layers):
            layer.attention = GQAGPTNeoXAttention(config, layer_idx=i)
        self.post_init()


register_checkpoint_conversion_mapping(GQAGPTNeoXForCausalLM.__name__,
                                       [WeightRenaming(source_patterns=r"^embed_out\.", target_patterns="lm_head.")],
                                       overwrite=True)


# save_pretrained copies this file next to the weights and writes auto_map, so saved checkpoints (after uptraining,
# say) load with trust_remote_code=True just as converted ones do.
GQAGPTNeoXConfig.register_for_auto_class()
GQAGPTNeoXForCausalLM.register_for_auto_class("AutoModelForCausalLM")
