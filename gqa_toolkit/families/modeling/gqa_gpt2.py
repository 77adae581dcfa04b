"""GPT-2 with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G heads.

Written by gqa-toolkit into every converted GPT-2 directory, beside `gqa_attention.py` (the shared core), and
loaded from there with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Imports torch and
transformers only. `c_attn` is a Conv1D `[d, (H + 2G) * hd]` whose columns are `[q (H*hd) | k (G*hd) | v (G*hd)]`;
query head h uses KV head h // (H/G). Cross-attention (`add_cross_attention`) is not supported.
"""

from __future__ import annotations

from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from .gqa_attention import GroupedAttention, GroupedModel


class GQAGPT2Config(GPT2Config):
    model_type = "gqa_gpt2"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQAGPT2Attention(GroupedAttention, GPT2Attention):
    def __init__(self, config, is_cross_attention=False, layer_idx=None):
        if is_cross_attention:
            raise ValueError("gqa_gpt2 supports self-attention only; this config has add_cross_attention=True")
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        self.kv_dim = self.group_heads(self.num_heads, config.num_key_value_heads, self.head_dim)
        self.c_attn = Conv1D(self.embed_dim + 2 * self.kv_dim, self.embed_dim)
        self.upcast_scores = self.reorder_and_upcast_attn

    def attend(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
               encoder_attention_mask=None, output_attentions=False, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("gqa_gpt2 supports self-attention only")
        query, key, value = self.c_attn(hidden_states).split([self.embed_dim, self.kv_dim, self.kv_dim], dim=2)
        key, value = self.cached_kv(cache, lambda: (self.split_heads(key), self.split_heads(value)))  # (B, G, S, hd)
        out, weights = self.grouped_attention(self.split_heads(query), key, value, attention_mask,
                                              scaling=self.scaling, dropout=self.attn_dropout.p, **kwargs)
        return self.resid_dropout(self.c_proj(out)), weights


class GQAGPT2LMHeadModel(GroupedModel, GPT2LMHeadModel):
    config_class = GQAGPT2Config
    gqa_swaps, gqa_attention = (("transformer.h", "attn", ()),), GQAGPT2Attention


# save_pretrained copies this file (and the core it imports) next to the weights and writes auto_map, so saved
# checkpoints (after uptraining, say) load with trust_remote_code=True just as converted ones do.
GQAGPT2Config.register_for_auto_class()
GQAGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")
