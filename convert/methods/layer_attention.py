"""Standard attention over one layer's q, k, v, o weights, for refinement through the layer API (`convert_layer`
with `refine_steps`), where no model's own attention module is at hand: scaled dot-product attention, causal or
bidirectional, with RoPE on the rotary dims as `RopeLayout` lays them out (HF's rotate_half pairs, or GPT-J's
interleaved ones) at base `theta`, K/V heads shared by contiguous groups of query heads (repeat_kv).
"""

from __future__ import annotations

import torch
from torch import nn

from gqa_toolkit.families.rope import RopeLayout


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class LayerAttention(nn.Module):
    """`forward(x, keys=None)`: x (B, T, d) the query input, keys (B, S, d_k) the K/V input (None: x)."""

    def __init__(self, weights, heads: int, kv_heads: int, rope: RopeLayout, *, causal: bool, theta: float):
        super().__init__()
        self.q, self.k = _linear(weights.q, weights.q_bias), _linear(weights.k, weights.k_bias)
        self.v, self.o = _linear(weights.v, weights.v_bias), _linear(weights.o, None)
        self.heads, self.kv_heads, self.rope, self.causal, self.theta = heads, kv_heads, rope, causal, theta

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        """RoPE on (B, n, T, hd) by position."""
        r = self.rope.rotary_dims
        if r == 0:
            return t
        positions = torch.arange(t.shape[2], dtype=torch.float32)
        inv_freq = self.theta ** (-torch.arange(0, r, 2, dtype=torch.float32) / r)  # (r/2,)
        angle = positions[:, None] * inv_freq  # (T, r/2)
        cos, sin = angle.cos(), angle.sin()
        rotary, free = t[..., :r], t[..., r:]
        if self.rope.interleaved:
            a, b = rotary[..., 0::2], rotary[..., 1::2]  # (B, n, T, r/2)
            turned = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)  # (B, n, T, r)
        else:
            a, b = rotary[..., :r // 2], rotary[..., r // 2:]
            turned = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        return torch.cat([turned, free], dim=-1)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        source = x if keys is None else keys
        B, T, S, hd = x.shape[0], x.shape[1], source.shape[1], self.rope.head_dim
        q = self.q(x).view(B, T, self.heads, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(source).view(B, S, self.kv_heads, hd).transpose(1, 2)  # (B, G0, S, hd)
        v = self.v(source).view(B, S, self.kv_heads, hd).transpose(1, 2)
        if keys is None:  # positions rotate queries and keys of one sequence (self-attention)
            q, k = self._rotate(q), self._rotate(k)
        share = self.heads // self.kv_heads
        k, v = k.repeat_interleave(share, 1), v.repeat_interleave(share, 1)  # (B, H, S, hd)
        with torch.autocast(x.device.type, enabled=False):  # float32 under bf16 refinement, as for stock modules
            out = nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                             is_causal=self.causal and keys is None)
        return self.o(out.transpose(1, 2).reshape(B, T, self.heads * hd))  # (B, T, d_out)
