"""T5 with grouped-query attention, as in the GQA paper: G key/value heads shared by H query heads.

Written by gqa-toolkit into every converted T5 directory, beside `gqa_attention.py` (the shared core), and loaded
from there with `AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)`. Imports torch and
transformers only. `num_key_value_heads` counts the decoder's self-attention K/V heads, `cross_num_key_value_heads`
its cross-attention's (None: the decoder's count, as outputs written before it existed have), both held by the KV
cache; `encoder_num_key_value_heads` the encoder's (None: MHA, the paper's choice). `k` and `v` are
`[G * d_kv, d_model]` (head-major); query head h uses KV head h // (H/G). The relative position bias is per query
head and unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Attention, T5ForConditionalGeneration

from .gqa_attention import GroupedAttention, GroupedModel


class GQAT5Config(T5Config):
    model_type = "gqa_t5"
    num_key_value_heads: int | None = None  # decoder self-attention (and cross-attention, unless set); None: MHA
    cross_num_key_value_heads: int | None = None  # decoder cross-attention; None: as the decoder's self-attention
    encoder_num_key_value_heads: int | None = None  # encoder self-attention; None: MHA


class GQAT5Attention(GroupedAttention, T5Attention):
    def __init__(self, config, has_relative_attention_bias=False, layer_idx=None, is_causal=False,
                 num_key_value_heads=None):
        super().__init__(config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx,
                         is_causal=is_causal)
        kv_dim = self.group_heads(self.n_heads, num_key_value_heads, self.key_value_proj_dim)
        self.k = nn.Linear(self.d_model, kv_dim, bias=False)
        self.v = nn.Linear(self.d_model, kv_dim, bias=False)

    def attend(self, hidden_states, cache=None, mask=None, key_value_states=None, position_bias=None, **kwargs):
        query = self.split_heads(self.q(hidden_states))  # (B, H, T, d_kv)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0  # read before this step's update
        past = past.clone() if isinstance(past, torch.Tensor) else past
        states = hidden_states if key_value_states is None else key_value_states
        key, value = self.cached_kv(cache, lambda: (self.split_heads(self.k(states)), self.split_heads(self.v(states))),
                                    cross=key_value_states is not None)  # (B, G, S, d_kv)
        if position_bias is None:  # the first layer computes it; the stack hands it to the others
            position_bias = self.position_bias(query.shape[2], key.shape[2], past, query)
        out, weights = self.grouped_attention(query, key, value, mask, scaling=self.scaling, dropout=self.dropout,
                                              position_bias=position_bias, **kwargs)
        return self.o(out), position_bias, weights

    def position_bias(self, query_length: int, key_length: int, past, query: torch.Tensor) -> torch.Tensor:
        """(1, H, T, S): the relative position bias, or zeros in layers that have none."""
        if self.has_relative_attention_bias:
            return self.compute_bias(query_length, key_length, device=query.device, past_seen_tokens=past)
        bias = torch.zeros((1, self.n_heads, query_length, key_length), device=query.device, dtype=query.dtype)
        if self.gradient_checkpointing and self.training:
            bias.requires_grad = True
        return bias


class GQAT5ForConditionalGeneration(GroupedModel, T5ForConditionalGeneration):
    config_class, gqa_attention = GQAT5Config, GQAT5Attention
    gqa_swaps = (("encoder.block", "layer.0.SelfAttention", ("encoder_num_key_value_heads",)),
                 ("decoder.block", "layer.0.SelfAttention", ("num_key_value_heads",)),
                 ("decoder.block", "layer.1.EncDecAttention", ("cross_num_key_value_heads", "num_key_value_heads")))

    def grouped(self, attn: T5Attention, num_key_value_heads, layer_idx) -> GQAT5Attention:
        return GQAT5Attention(attn.config, has_relative_attention_bias=attn.has_relative_attention_bias,
                              layer_idx=attn.layer_idx, is_causal=attn.is_causal,
                              num_key_value_heads=num_key_value_heads)


# save_pretrained copies this file (and the core it imports) next to the weights and writes auto_map, so saved
# checkpoints (after uptraining, say) load with trust_remote_code=True just as converted ones do.
GQAT5Config.register_for_auto_class()
GQAT5ForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
