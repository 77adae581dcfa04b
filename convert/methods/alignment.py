"""`aligned`: rotate every KV head into its group's common basis by orthogonal Procrustes, then average.

Averaging heads that were never trained to agree cancels them out; a head and a rotated copy of it compute the
same attention once the rotation is folded into its readers. Key rotations are one angle per RoPE pair (they
commute with the rotary embedding, see rope.py) plus any orthogonal map on non-rotary dims, folded into the
head's queries; value rotations are any orthogonal map, folded into the output projection. With one head per
group the rotations are exact, so alignment alone keeps the function (tests/test_convert_methods_exact.py).
"""

from __future__ import annotations

import torch

from gqa_toolkit.families.rope import KeyMap
from .layer_types import PerHeadWeights, LayerContext, LayerResult
from .registry import register_layer_method

ITERATIONS = 8  # generalised Procrustes: align to the group's mean, recompute the mean, repeat


def align_pairs(z: torch.Tensor) -> torch.Tensor:
    """z `(G, r, P, c)` complex -> unit phases alpha `(G, r, P)` with z_j ~= alpha_j * common."""
    common = z[:, 0]  # (G, P, c)
    alpha = torch.ones(z.shape[:3], dtype=z.dtype)
    for _ in range(ITERATIONS):
        inner = (z * common[:, None].conj()).sum(-1)  # (G, r, P)
        alpha = torch.where(inner.abs() > 0, inner / inner.abs().clamp_min(1e-300), torch.ones_like(inner))
        common = (alpha.conj()[..., None] * z).mean(1)  # (G, P, c)
    return alpha


def align_matrices(x: torch.Tensor) -> torch.Tensor:
    """x `(G, r, m, c)` real -> orthogonal maps `(G, r, m, m)` with x_j ~= M_j common."""
    G, r, m, _ = x.shape
    maps = torch.eye(m, dtype=x.dtype).expand(G, r, m, m)
    if m == 0:
        return maps.clone()
    common = x[:, 0]  # (G, m, c)
    for _ in range(ITERATIONS):
        u, _, vh = torch.linalg.svd(x @ common[:, None].transpose(-1, -2))  # (G, r, m, m) each
        maps = u @ vh
        common = (maps.transpose(-1, -2) @ x).mean(1)  # (G, m, c)
    return maps


def rotations(per_head: PerHeadWeights, groups: int, ctx: LayerContext) -> tuple[KeyMap, torch.Tensor]:
    """Per source KV head: the RoPE-commuting key rotation and the value rotation into its group's basis."""
    layout = ctx.layout
    G0, hd, ck = per_head.k.shape
    r = G0 // groups
    km = per_head.k @ ctx.metric_k  # (G0, hd, ck) in the error metric
    z = layout.to_complex(km).reshape(groups, r, layout.pairs, ck)  # (G, r, P, ck)
    free = layout.free_rows(km).reshape(groups, r, layout.free, ck)  # (G, r, f, ck)
    key_map = KeyMap(align_pairs(z).reshape(G0, layout.pairs), align_matrices(free).reshape(G0, layout.free,
                                                                                              layout.free))
    vm = (per_head.v @ ctx.metric_v).reshape(groups, r, hd, -1)  # (G, r, hd, cv)
    return key_map, align_matrices(vm).reshape(G0, hd, hd)


def rotated_heads(per_head: PerHeadWeights, groups: int, ctx: LayerContext) -> LayerResult:
    """Every head rotated into its group's basis, none merged yet: a LayerResult with G0 heads."""
    key_map, value_map = rotations(per_head, groups, ctx)
    k = key_map.apply_transposed(per_head.k, ctx.layout)  # (G0, hd, ck): M^T k_j, M orthogonal
    v = value_map.transpose(1, 2) @ per_head.v  # (G0, hd, cv)
    return LayerResult(k, key_map, v, value_map)


@register_layer_method("aligned", pools=True)
def aligned(per_head: PerHeadWeights, groups: int, ctx: LayerContext) -> LayerResult:
    """Procrustes-align each group's heads (key rotations that commute with the positions), then average."""
    heads = rotated_heads(per_head, groups, ctx)
    G0 = per_head.k.shape[0]
    k = heads.k.reshape(groups, G0 // groups, *heads.k.shape[1:]).mean(1)  # (G, hd, ck)
    v = heads.v.reshape(groups, G0 // groups, *heads.v.shape[1:]).mean(1)  # (G, hd, cv)
    return LayerResult(k, heads.key_map, v, heads.value_map)
