"""GPT-NeoX (Pythia) with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G.

Written by gqa-toolkit into every converted GPT-NeoX directory, beside `gqa_attention.py` (the shared core), and
loaded from there with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Imports torch and
transformers only. `query_key_value` is fused per group: rows `[G, (q * H/G, k, v), hd]`, which for G = H is the
stock per-head layout `[H, (q, k, v), hd]`. Query head h uses KV head h // (H/G).
"""

from __future__ import annotations

from torch import nn
from transformers import GPTNeoXConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXForCausalLM, apply_rotary_pos_emb

from .gqa_attention import GroupedAttention, GroupedModel


class GQAGPTNeoXConfig(GPTNeoXConfig):
    model_type = "gqa_gpt_neox"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQAGPTNeoXAttention(GroupedAttention, GPTNeoXAttention):
    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        kv_dim = self.group_heads(self.num_heads, config.num_key_value_heads, self.head_size)
        self.query_key_value = nn.Linear(config.hidden_size, self.num_heads * self.head_size + 2 * kv_dim,
                                         bias=config.attention_bias)

    def attend(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        input_shape, per_group = hidden_states.shape[:-1], self.num_key_value_groups  # (B, T), H/G
        qkv = self.query_key_value(hidden_states)
        qkv = qkv.view(*input_shape, self.num_key_value_heads, per_group + 2, self.head_size)  # (B, T, G, H/G+2, hd)
        query = qkv[..., :per_group, :].reshape(*input_shape, self.num_heads, self.head_size).transpose(1, 2)
        key, value = qkv[..., per_group, :].transpose(1, 2), qkv[..., per_group + 1, :].transpose(1, 2)  # (B,G,T,hd)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)  # query (B, H, T, hd)
        key, value = self.cached_kv(cache, lambda: (key, value))
        out, weights = self.grouped_attention(query, key, value, attention_mask, scaling=self.scaling,
                                              dropout=self.attention_dropout, **kwargs)
        return self.dense(out), weights


class GQAGPTNeoXForCausalLM(GroupedModel, GPTNeoXForCausalLM):
    config_class = GQAGPTNeoXConfig
    # transformers skips its own checkpoint renames for code outside the library; GPT-NeoX checkpoints name the LM
    # head `embed_out` on disk, so the rename is registered for this class explicitly (below).
    gqa_swaps, gqa_attention = (("gpt_neox.layers", "attention", ()),), GQAGPTNeoXAttention


register_checkpoint_conversion_mapping(GQAGPTNeoXForCausalLM.__name__,
                                       [WeightRenaming(source_patterns=r"^embed_out\.", target_patterns="lm_head.")],
                                       overwrite=True)


# save_pretrained copies this file (and the core it imports) next to the weights and writes auto_map, so saved
# checkpoints (after uptraining, say) load with trust_remote_code=True just as converted ones do.
GQAGPTNeoXConfig.register_for_auto_class()
GQAGPTNeoXForCausalLM.register_for_auto_class("AutoModelForCausalLM")
