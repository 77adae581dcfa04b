"""OPT with grouped-query attention: G key/value heads shared by H query heads; the KV cache holds G heads.

Written by gqa-toolkit into every converted OPT directory and loaded from there with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Self-contained: imports torch and transformers
only. `k_proj` and `v_proj` are `[G*hd, d]` (head-major); query head h uses KV head h // (H/G).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import OPTConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM, eager_attention_forward


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, T, hd) -> (B, G * n_rep, T, hd): KV head j serves query heads j*n_rep .. (j+1)*n_rep - 1."""
    if n_rep == 1:
        return x
    B, G, T, hd = x.shape
    return x[:, :, None].expand(B, G, n_rep, T, hd).reshape(B, G * n_rep, T, hd)


class GQAOPTConfig(OPTConfig):
    model_type = "gqa_opt"
    num_key_value_heads: int | None = None  # None: one per query head (MHA)


class GQAOPTAttention(OPTAttention):
    def __init__(self, config, layer_idx=None, **kwargs):
        super().__init__(config, layer_idx=layer_idx, **kwargs)
        self.num_key_value_heads = config.num_key_value_heads or self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} does not divide "
                             f"num_attention_heads={self.num_heads}")
        # read by transformers' sdpa and flash attention, which share each K/V head among its query heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        kv_dim = self.num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False, **kwargs):
        B, T, _ = hidden_states.size()
        q = self.q_proj(hidden_states) * self.scaling  # scaled before the matmul, as OPT does
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, G, T, hd)

        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # the cache holds G heads
        if self.config._attn_implementation == "eager":  # the stock eager attention wants H K/V heads
            k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)  # (B, H, T, hd)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.dropout,
                                 scaling=1.0, **kwargs)
        out = out.reshape(B, T, -1).contiguous()  # (B, T, H*hd)
        return self.out_proj(out), weights


class GQAOPTForCausalLM(OPTForCausalLM):
    config_class = GQAOPTConfig

    def __init__(self, config: GQAOPTConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.decoder.layers):
            layer.self_attn = GQAOPTAttention(config, layer_idx=i)
        self.post_init()


# save_pretrained copies this file next to the weights and writes auto_map, so saved checkpoints (after uptraining,
# say) load with trust_remote_code=True just as converted ones do.
GQAOPTConfig.register_for_auto_class()
GQAOPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
