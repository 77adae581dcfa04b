"""`fit`: choose each group's shared K and V, and every head's compensating Q and O maps, by least squares on
calibration activations.

With x the layer's attention input and E[x x^T] = L L^T, a source head's keys are approximated as
k_j(x) ~= M_j k_shared(x), where M_j commutes with RoPE (a complex scalar per rotary pair, any matrix on the free
dims) and is folded into the head's queries (q -> M_j^T q, exact for any M_j); values as v_j ~= N_j v_shared, with
N_j folded into the output columns (o_h -> o_h N_j). Each part's error is weighted by what reads it: key pairs by
their queries' energy E|q_p|^2, free key dims by E[q q^T], values by o_h^T o_h. The optimum of each weighted
problem is a truncated SVD of the group's stacked heads: rank 1 (complex) per rotary pair, rank f on free dims,
rank hd for values. With one head per group the fit is exact.
"""

from __future__ import annotations

import torch

from gqa_toolkit.families.rope import KeyMap
from .layer_types import PerHeadWeights, LayerContext, LayerResult
from .registry import register_layer_method

RIDGE = 1e-6


def _sqrtm(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of PSD matrices `(..., m, m)`, ridged so it inverts."""
    m = a.shape[-1]
    if m == 0:
        return a.clone()
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    evals, evecs = torch.linalg.eigh(a + RIDGE * scale * torch.eye(m, dtype=a.dtype))
    return evecs @ (evals.clamp_min(0).sqrt()[..., None] * evecs.transpose(-1, -2))


def joint_fit(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x `(G0, m, c)` -> maps `(G0, m, m)` and shared `(G, m, c)` minimising sum_j ||x_j - A_j shared||^2."""
    G0, m, c = x.shape
    r = G0 // groups
    if m == 0:
        return x.new_zeros(G0, 0, 0), x.new_zeros(groups, 0, c)
    u, s, vh = torch.linalg.svd(x.reshape(groups, r * m, c), full_matrices=False)  # stacked (G, r*m, c)
    k = min(m, s.shape[-1])
    shared = x.new_zeros(groups, m, c)
    shared[:, :k] = s[:, :k, None] / r ** 0.5 * vh[:, :k]  # (G, k, c)
    maps = x.new_zeros(groups, r * m, m)
    maps[..., :k] = u[..., :k] * r ** 0.5  # (G, r*m, k)
    return maps.reshape(G0, m, m), shared


def _fit_pairs(z: torch.Tensor, weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z `(G0, P, c)` complex, weight `(G0, P)` -> alpha `(G0, P)`, shared `(G, P, c)`: z_j ~= alpha_j shared."""
    G0, P, c = z.shape
    r = G0 // groups
    zw = (weight[..., None] * z).reshape(groups, r, P, c).transpose(1, 2)  # (G, P, r, c)
    u, s, vh = torch.linalg.svd(zw, full_matrices=False)
    alpha = u[..., 0].transpose(1, 2).reshape(G0, P) / weight  # (G0, P)
    scale = alpha.abs().reshape(groups, r, P).mean(1).clamp_min(1e-30)  # (G, P): keep |alpha| about 1
    alpha = alpha / scale.repeat_interleave(r, 0)
    shared = (s[..., 0] * scale)[..., None] * vh[..., 0, :]  # (G, P, c)
    return alpha, shared


@register_layer_method("fit", pools=False, calibrated=True)
def fit(per_head: PerHeadWeights, groups: int, ctx: LayerContext) -> LayerResult:
    """Least-squares shared K/V (weighed by calibration activations when given), with Q and O compensating."""
    layout = ctx.layout
    R = layout.rotary_dims
    km = per_head.k @ ctx.metric_k  # (G0, hd, ck)
    energy = ctx.query_second.diagonal(dim1=1, dim2=2)  # (G0, hd)
    weight = layout.pair_sum(energy).clamp_min(1e-30).sqrt()  # (G0, P)
    alpha, shared_pairs = _fit_pairs(layout.to_complex(km), weight, groups)
    sq = _sqrtm(ctx.query_second[:, R:, R:])  # (G0, f, f)
    free_w, shared_free = joint_fit(sq @ layout.free_rows(km), groups)
    free = torch.linalg.solve(sq, free_w) if layout.free else free_w  # (G0, f, f)
    k = layout.from_complex(shared_pairs, shared_free) @ torch.linalg.inv(ctx.metric_k)  # (G, hd, ck)

    so = _sqrtm(ctx.out_second)  # (G0, hd, hd)
    value_w, shared_v = joint_fit(so @ (per_head.v @ ctx.metric_v), groups)
    v = shared_v @ torch.linalg.inv(ctx.metric_v)  # (G, hd, cv)
    return LayerResult(k, KeyMap(alpha, free), v, torch.linalg.solve(so, value_w))
