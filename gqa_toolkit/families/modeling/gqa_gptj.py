"""GPT-J with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G heads.

Written by gqa-toolkit into every converted GPT-J directory, beside `gqa_attention.py` (the shared core), and
loaded from there with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Imports torch and
transformers only. `k_proj` and `v_proj` are `[G*hd, d]` (head-major, no bias); query head h uses KV head
h // (H/G). The first `rotary_dim` dims of each head rotate in interleaved pairs (2i, 2i + 1), as in stock GPT-J.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTJConfig
from transformers.models.gptj.modeling_gptj import GPTJAttention, GPTJForCausalLM, apply_rotary_pos_emb

from .gqa_attention import GroupedAttention, GroupedModel


class GQAGPTJConfig(GPTJConfig):
    model_type = "gqa_gptj"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQAGPTJAttention(GroupedAttention, GPTJAttention):
    upcast_scores = True  # stock GPT-J computes Q K^T in float32

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx)
        kv_dim = self.group_heads(self.num_attention_heads, config.num_key_value_heads, self.head_dim)
        self.k_proj = nn.Linear(self.embed_dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, kv_dim, bias=False)

    def attend(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, position_ids=None,
               use_cache=None, output_attentions=False, **kwargs):
        heads_shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # (B, T, n, hd)
        sin, cos = position_embeddings if position_embeddings is not None else \
            self.sin_cos(position_ids, hidden_states.dtype)
        query = self.rotate(self.q_proj(hidden_states).view(heads_shape), sin, cos).transpose(1, 2)  # (B, H, T, hd)
        key, value = self.cached_kv(cache, lambda: (
            self.rotate(self.k_proj(hidden_states).view(heads_shape), sin, cos).transpose(1, 2),  # (B, G, T, hd)
            self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)))
        out, weights = self.grouped_attention(query, key, value, attention_mask, scaling=self.head_dim ** -0.5,
                                              dropout=self.config.attn_pdrop, **kwargs)
        return self.resid_dropout(self.out_proj(out)), weights

    def rotate(self, x, sin, cos):
        """Rotary embedding on the first `rotary_dim` dims of (B, T, n, hd); the rest pass through."""
        r = self.rotary_dim or x.shape[-1]
        return torch.cat([apply_rotary_pos_emb(x[..., :r], sin, cos), x[..., r:]], dim=-1)

    def sin_cos(self, position_ids, dtype):
        """Releases before the model-level rotary module (transformers 5.16): each attention keeps its own table."""
        table = self.embed_positions.to(position_ids.device)[position_ids].to(dtype)  # (B, T, r)
        return table.chunk(2, dim=-1)


class GQAGPTJForCausalLM(GroupedModel, GPTJForCausalLM):
    config_class = GQAGPTJConfig
    gqa_swaps, gqa_attention = (("transformer.h", "attn", ()),), GQAGPTJAttention


# save_pretrained copies this file (and the core it imports) next to the weights and writes auto_map, so saved
# checkpoints (after uptraining, say) load with trust_remote_code=True just as converted ones do.
GQAGPTJConfig.register_for_auto_class()
GQAGPTJForCausalLM.register_for_auto_class("AutoModelForCausalLM")
