"""T5 with grouped-query attention, as in the GQA paper: G key/value heads shared by H query heads.

Written by gqa-toolkit into every converted T5 directory and loaded from there with
`AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)`. Self-contained: imports torch and
transformers only. `num_key_value_heads` counts the decoder's K/V heads (self- and cross-attention, the ones the
KV cache holds); `encoder_num_key_value_heads` the encoder's (None: MHA, the paper's choice). `k` and `v` are
`[G * d_kv, d_model]` (head-major); query head h uses KV head h // (H/G). The relative position bias is per query
head and unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.t5.modeling_t5 import T5Attention, T5ForConditionalGeneration, eager_attention_forward


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, T, hd) -> (B, G * n_rep, T, hd): KV head j serves query heads j*n_rep .. (j+1)*n_rep - 1."""
    if n_rep == 1:
        return x
    B, G, T, hd = x.shape
    return x[:, :, None].expand(B, G, n_rep, T, hd).reshape(B, G * n_rep, T, hd)


class GQAT5Config(T5Config):
    model_type = "gqa_t5"
    num_key_value_heads: int | None = None  # decoder self- and cross-attention; None: MHA
    encoder_num_key_value_heads: int | None = None  # encoder self-attention; None: MHA


class GQAT5Attention(T5Attention):
    def __init__(self, config, has_relative_attention_bias=False, layer_idx=None, is_causal=False,
                 num_key_value_heads=None):
        super().__init__(config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx,
                         is_causal=is_causal)
        self.num_key_value_heads = num_key_value_heads or self.n_heads
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_key_value_heads} KV heads do not divide num_heads={self.n_heads}")
        # read by transformers' sdpa and flash attention, which share each K/V head among its query heads
        self.num_key_value_groups = self.n_heads // self.num_key_value_heads
        kv_dim = self.num_key_value_heads * self.key_value_proj_dim
        self.k = nn.Linear(self.d_model, kv_dim, bias=False)
        self.v = nn.Linear(self.d_model, kv_dim, bias=False)

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, past_key_values=None,
                **kwargs):
        input_shape = hidden_states.shape[:-1]  # (B, T)
        past_seen = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        past_seen = past_seen.clone() if isinstance(past_seen, torch.Tensor) else past_seen
        is_cross = key_value_states is not None
        q = self.q(hidden_states).view(*input_shape, -1, self.key_value_proj_dim).transpose(1, 2)  # (B, H, T, hd)

        is_updated, cache = False, past_key_values
        if isinstance(past_key_values, EncoderDecoderCache):
            is_updated = past_key_values.is_updated.get(self.layer_idx)
            cache = past_key_values.cross_attention_cache if is_cross else past_key_values.self_attention_cache
        if is_cross and past_key_values is not None and is_updated:
            k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values  # (B, G, S, hd)
        else:
            states = key_value_states if is_cross else hidden_states
            kv_shape = (*states.shape[:-1], -1, self.key_value_proj_dim)
            k = self.k(states).view(kv_shape).transpose(1, 2)  # (B, G, S, hd)
            v = self.v(states).view(kv_shape).transpose(1, 2)
            if past_key_values is not None:
                k, v = cache.update(k, v, self.layer_idx)  # the cache holds G heads
                if is_cross and isinstance(past_key_values, EncoderDecoderCache):
                    past_key_values.is_updated[self.layer_idx] = True

        if position_bias is None:
            key_length = k.shape[-2]
            if not self.has_relative_attention_bias:
                position_bias = torch.zeros((1, self.n_heads, input_shape[1], key_length), device=q.device,
                                            dtype=q.dtype)
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True
            else:
                position_bias = self.compute_bias(input_shape[1], key_length, device=q.device,
                                                  past_seen_tokens=past_seen)

        if self.config._attn_implementation == "eager":  # the stock eager attention wants H K/V heads
            k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)  # (B, H, S, hd)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, mask, dropout=0.0 if not self.training else self.dropout,
                                 scaling=self.scaling, position_bias=position_bias, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()  # (B, T, H*hd)
        return self.o(out), position_bias, weights


def _grouped(attn: T5Attention, num_key_value_heads: int | None) -> GQAT5Attention:
    return GQAT5Attention(attn.config, has_relative_attention_bias=attn.has_relative_attention_bias,
                          layer_idx=attn.layer_idx, is_causal=attn.is_causal, num_key_value_heads=num_key_value_heads)


class GQAT5ForConditionalGeneration(T5ForConditionalGeneration):
    config_class = GQAT5Config

    def __init__(self, config: GQAT5Config):
        super().__init__(config)
        for block in self.encoder.block:
            block.layer[0].SelfAttention = _grouped(block.layer[0].SelfAttention, config.encoder_num_key_value_heads)
        for block in self.decoder.block:
            block.layer[0].SelfAttention = _grouped(block.layer[0].SelfAttention, config.num_key_value_heads)
            block.layer[1].EncDecAttention = _grouped(block.layer[1].EncDecAttention, config.num_key_value_heads)
        self.post_init()


# save_pretrained copies this file next to the weights and writes auto_map, so saved checkpoints (after uptraining,
# say) load with trust_remote_code=True just as converted ones do.
GQAT5Config.register_for_auto_class()
GQAT5ForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
