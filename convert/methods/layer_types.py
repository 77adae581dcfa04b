"""One attention layer as per-head tensors, the input statistics that weigh its errors, and a method's result.

Biases ride along as an extra input column (x -> [x; 1]), so every map and fit treats a head's weight and bias
as one matrix `(hd, d + 1)`. All arithmetic is float64; `convert_layer` casts back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gqa_toolkit.families.rope import KeyMap, RopeLayout

RIDGE = 1e-6  # relative ridge on the input second moment: keeps its Cholesky factor invertible


@dataclass
class InputMoments:
    """E[[x; 1][x; 1]^T] of one layer's attention input x, `(d + 1, d + 1)`, accumulated batch by batch."""

    d: int
    total: torch.Tensor = field(default=None)  # (d + 1, d + 1) sum
    count: int = 0

    def __post_init__(self):
        if self.total is None:
            self.total = torch.zeros(self.d + 1, self.d + 1, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.d).double()  # (N, d), on the device that computed it
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)  # (N, d + 1)
        self.total += (xa.T @ xa).to(self.total.device)
        self.count += len(x)

    @staticmethod
    def from_inputs(x: torch.Tensor) -> "InputMoments":
        moments = InputMoments(x.shape[-1])
        moments.add(x)
        return moments

    def metric(self, width: int) -> torch.Tensor:
        """L with L L^T = the second moment of the first `width` input columns (d, or d + 1 with the bias)."""
        c = self.total[:width, :width] / max(self.count, 1)
        c = c + RIDGE * c.diagonal().mean() * torch.eye(width, dtype=c.dtype)
        return torch.linalg.cholesky(c)


@dataclass(frozen=True)
class LayerResult:
    k: torch.Tensor  # (G, hd, ck) shared keys
    key_map: KeyMap  # per source KV head: k_j ~= M_j k_shared; its queries become M_j^T q
    v: torch.Tensor  # (G, hd, cv) shared values
    value_map: torch.Tensor  # (G0, hd, hd) N_j: v_j ~= N_j v_shared; its output columns become o N_j


@dataclass(frozen=True)
class PerHeadWeights:
    """One attention's Q, K, V and O weights split per head (a bias as an extra input column)."""
    q: torch.Tensor  # (H, hd, cq)
    k: torch.Tensor  # (G0, hd, ck)
    v: torch.Tensor  # (G0, hd, cv)
    o: torch.Tensor  # (d_out, H, hd)
    bias: frozenset[str]  # which of q, k, v carry a bias column

    @staticmethod
    def from_weights(w, heads: int, kv_heads: int) -> "PerHeadWeights":
        def heads_of(weight, bias, n):
            t = weight.double() if bias is None else torch.cat([weight.double(), bias.double()[:, None]], dim=1)
            return t.reshape(n, -1, t.shape[1])  # (n, hd, d [+ 1])

        hd = w.q.shape[0] // heads
        bias = frozenset(p for p in "qkv" if getattr(w, f"{p}_bias") is not None)
        return PerHeadWeights(q=heads_of(w.q, w.q_bias, heads), k=heads_of(w.k, w.k_bias, kv_heads),
                         v=heads_of(w.v, w.v_bias, kv_heads),
                         o=w.o.double().reshape(w.o.shape[0], heads, hd), bias=bias)  # (d_out, H, hd)

    @property
    def per_kv(self) -> int:
        return self.q.shape[0] // self.k.shape[0]  # query heads per source KV head

    def kv_of_query(self) -> torch.Tensor:
        return torch.arange(self.k.shape[0]).repeat_interleave(self.per_kv)  # (H,)

    def split_bias(self, t: torch.Tensor, part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (t[..., :-1], t[..., -1]) if part in self.bias else (t, None)

    def permuted(self, order: list[int]) -> "PerHeadWeights":
        """KV head `order[p]` moves to position p, with its query heads and their output columns."""
        G0, n = self.k.shape[0], self.per_kv
        q = self.q.reshape(G0, n, *self.q.shape[1:])[order].flatten(0, 1)  # (H, hd, cq)
        o = self.o.reshape(self.o.shape[0], G0, n, -1)[:, order].flatten(1, 2)  # (d_out, H, hd)
        return PerHeadWeights(q=q, k=self.k[order], v=self.v[order], o=o, bias=self.bias)

    def assembled(self, result: LayerResult, rope: RopeLayout) -> dict[str, torch.Tensor | None]:
        """Weights in nn.Linear layout: shared K/V, queries through M^T, output columns through N."""
        idx = self.kv_of_query()
        q = result.key_map.index(idx).apply_transposed(self.q, rope)  # (H, hd, cq)
        o = torch.einsum("dhi,hij->dhj", self.o, result.value_map[idx])  # (d_out, H, hd)
        out = {"o": o.flatten(1)}
        for part, t in (("q", q), ("k", result.k), ("v", result.v)):
            weight, bias = self.split_bias(t, part)
            out[part] = weight.flatten(0, 1)  # (n*hd, d)
            out[f"{part}_bias"] = bias.flatten() if bias is not None else None
        return out


@dataclass(frozen=True)
class LayerContext:
    layout: RopeLayout
    metric_q: torch.Tensor  # (cq, cq) L: errors are measured as ||E L|| (identity without calibration)
    metric_k: torch.Tensor  # (ck, ck)
    metric_v: torch.Tensor  # (cv, cv)
    query_second: torch.Tensor  # (G0, hd, hd) sum over a KV head's query heads of E[q q^T]
    out_second: torch.Tensor  # (G0, hd, hd) sum over a KV head's query heads of o_h^T o_h
    seed: int = 0
    init_std: float = 0.02
    names: dict = field(default_factory=dict)  # "k.weight" -> on-disk name, for per-tensor seeds

    @staticmethod
    def build(per_head: PerHeadWeights, layout: RopeLayout, moments: InputMoments | None, *, seed: int, init_std: float,
              names: dict, key_moments: InputMoments | None = None) -> "LayerContext":
        """`key_moments`: the moments of K's and V's input where it is not Q's (cross-attention reads the
        encoder's states); None: they read what Q reads."""
        def metric(t: torch.Tensor, of: InputMoments | None) -> torch.Tensor:
            width = t.shape[-1]
            return torch.eye(width, dtype=torch.float64) if of is None else of.metric(width)

        keys = key_moments if key_moments is not None else moments
        mq, mk, mv = metric(per_head.q, moments), metric(per_head.k, keys), metric(per_head.v, keys)
        G0, n, hd = per_head.k.shape[0], per_head.per_kv, per_head.k.shape[1]
        ql = (per_head.q @ mq).reshape(G0, n, hd, -1)  # (G0, n, hd, cq)
        query_second = torch.einsum("gnic,gnjc->gij", ql, ql) / ql.shape[-1]  # (G0, hd, hd)
        o = per_head.o.reshape(per_head.o.shape[0], G0, n, hd)  # (d_out, G0, n, hd)
        out_second = torch.einsum("dgni,dgnj->gij", o, o)  # (G0, hd, hd)
        return LayerContext(layout, mq, mk, mv, query_second, out_second, seed, init_std, names)
