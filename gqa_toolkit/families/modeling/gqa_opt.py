"""OPT with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G heads.

Written by gqa-toolkit into every converted OPT directory, beside `gqa_attention.py` (the shared core), and loaded
from there with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Imports torch and transformers
only. `k_proj` and `v_proj` are `[G*hd, d]` (head-major); query head h uses KV head h // (H/G).
"""

from __future__ import annotations

from torch import nn
from transformers import OPTConfig
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM

from .gqa_attention import GroupedAttention, GroupedModel


class GQAOPTConfig(OPTConfig):
    model_type = "gqa_opt"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQAOPTAttention(GroupedAttention, OPTAttention):
    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        kv_dim = self.group_heads(self.num_heads, config.num_key_value_heads, self.head_dim)
        self.k_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)

    def attend(self, hidden_states, cache=None, attention_mask=None, output_attentions=False, **kwargs):
        query = self.split_heads(self.q_proj(hidden_states) * self.scaling)  # (B, H, T, hd), scaled first as OPT does
        key, value = self.cached_kv(cache, lambda: (self.split_heads(self.k_proj(hidden_states)),
                                                    self.split_heads(self.v_proj(hidden_states))))
        out, weights = self.grouped_attention(query, key, value, attention_mask, scaling=1.0, dropout=self.dropout,
                                              **kwargs)
        return self.out_proj(out), weights


class GQAOPTForCausalLM(GroupedModel, OPTForCausalLM):
    config_class = GQAOPTConfig
    gqa_swaps, gqa_attention = (("model.decoder.layers", "self_attn", ()),), GQAOPTAttention


# save_pretrained copies this file (and the core it imports) next to the weights and writes auto_map, so saved
# checkpoints (after uptraining, say) load with trust_remote_code=True just as converted ones do.
GQAOPTConfig.register_for_auto_class()
GQAOPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
