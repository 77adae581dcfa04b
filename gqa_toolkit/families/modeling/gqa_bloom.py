"""BLOOM with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G heads.

Written by gqa-toolkit into every converted BLOOM directory, beside `gqa_attention.py` (the shared core), and
loaded from there with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Imports torch and
transformers only. `query_key_value` is fused per group: rows `[G, (q * H/G, k, v), hd]`, which for G = H is the
stock per-head layout `[H, (q, k, v), hd]`. Query head h uses KV head h // (H/G). ALiBi is a bias per query head
that does not depend on the keys, so it is added to the scores as stock BLOOM adds it.
"""

from __future__ import annotations

from torch import nn
from transformers import BloomConfig
from transformers.models.bloom.modeling_bloom import BloomAttention, BloomForCausalLM, dropout_add

from .gqa_attention import GroupedAttention, GroupedModel


class GQABloomConfig(BloomConfig):
    model_type = "gqa_bloom"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQABloomAttention(GroupedAttention, BloomAttention):
    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx)
        self.config = config  # read by the core for the attention implementation; stock BLOOM keeps no config
        kv_dim = self.group_heads(self.num_heads, config.num_key_value_heads, self.head_dim)
        self.query_key_value = nn.Linear(self.hidden_size, self.hidden_size + 2 * kv_dim, bias=True)

    def attend(self, hidden_states, residual, alibi, attention_mask=None, cache=None, use_cache=False,
               output_attentions=False, **kwargs):
        (B, T), per_group = hidden_states.shape[:-1], self.num_key_value_groups  # H/G
        qkv = self.query_key_value(hidden_states)
        qkv = qkv.view(B, T, self.num_key_value_heads, per_group + 2, self.head_dim)  # (B, T, G, H/G+2, hd)
        query = qkv[..., :per_group, :].reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        key, value = qkv[..., per_group, :].transpose(1, 2), qkv[..., per_group + 1, :].transpose(1, 2)  # (B,G,T,hd)
        key, value = self.cached_kv(cache, lambda: (key, value))
        position_bias = alibi.view(B, self.num_heads, 1, -1) * self.beta  # (B*H, 1, S) -> (B, H, 1, S)
        out, weights = self.grouped_attention(query, key, value, attention_mask, scaling=self.inv_norm_factor,
                                              dropout=self.attention_dropout.p, position_bias=position_bias,
                                              **kwargs)
        return dropout_add(self.dense(out), residual, self.hidden_dropout, self.training), weights


class GQABloomForCausalLM(GroupedModel, BloomForCausalLM):
    config_class = GQABloomConfig
    gqa_swaps, gqa_attention = (("transformer.h", "self_attention", ()),), GQABloomAttention


# save_pretrained copies this file (and the core it imports) next to the weights and writes auto_map, so saved
# checkpoints (after uptraining, say) load with trust_remote_code=True just as converted ones do.
GQABloomConfig.register_for_auto_class()
GQABloomForCausalLM.register_for_auto_class("AutoModelForCausalLM")
