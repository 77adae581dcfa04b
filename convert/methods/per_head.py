"""The per-head methods: K/V initialisers for the grouped heads.

Each is a pure function from the source's per-head tensor `(G0, ...)` to the grouped one `(G, ...)`, with groups
contiguous: source head j belongs to group j // (G0/G), the `repeat_kv` convention. Arithmetic runs in float32;
the caller casts back to the checkpoint's dtype.
"""

from __future__ import annotations

import torch

from .registry import MethodContext, register_method


def preserve_norms(heads: torch.Tensor, pooled: torch.Tensor, groups: int,
                   metric: torch.Tensor | None = None) -> torch.Tensor:
    """Scale each pooled head `(G, ...)` to the mean norm of its group's source heads `(G0, ...)`: averaging k
    nearly orthogonal heads shrinks the norm by about 1/sqrt(k) and flattens attention. `metric`: norms are taken
    of `head @ metric` (the calibration's input metric on the last axis)."""
    def norms(t: torch.Tensor) -> torch.Tensor:
        return (t if metric is None else t @ metric).reshape(t.shape[0], -1).norm(dim=1)

    target = norms(heads).view(groups, -1).mean(1)  # (G,)
    current = norms(pooled).clamp_min(1e-30)  # (G,)
    return pooled * (target / current).view(groups, *[1] * (pooled.dim() - 1))


def pool_heads(heads: torch.Tensor, groups: int, method: str, ctx: MethodContext,
               preserve_norm: bool = False) -> torch.Tensor:
    """A per-head method by name on `(G0, ...)` heads -> `(G, ...)`, with optional norm preservation: the one place
    every path applies them (a unit's K/V tensors, and `convert_layer`'s weights and biases)."""
    from .registry import per_head_methods

    pooled = per_head_methods()[method](heads, groups, ctx)
    if preserve_norm and heads.device.type != "meta":
        pooled = preserve_norms(heads, pooled, groups)
    return pooled


def _grouped(heads: torch.Tensor, groups: int) -> torch.Tensor:
    G0 = heads.shape[0]
    return heads.reshape(groups, G0 // groups, *heads.shape[1:])  # (G, G0/G, ...)


@register_method("mean")
def mean_pool(heads: torch.Tensor, groups: int, ctx: MethodContext) -> torch.Tensor:
    """Average the heads of each group (the paper's best conversion)."""
    return _grouped(heads, groups).mean(dim=1)


@register_method("first")
def first_head(heads: torch.Tensor, groups: int, ctx: MethodContext) -> torch.Tensor:
    """Keep the first head of each group."""
    return _grouped(heads, groups)[:, 0].clone()


@register_method("random")
def random_init(heads: torch.Tensor, groups: int, ctx: MethodContext) -> torch.Tensor:
    """Fresh weights from the model's own initialiser, reproducible by seed and tensor name."""
    shape = (groups, *heads.shape[1:])
    if ctx.init == "zeros":
        return torch.zeros(shape, dtype=heads.dtype, device=heads.device)
    if ctx.init == "ones":
        return torch.ones(shape, dtype=heads.dtype, device=heads.device)
    if heads.device.type == "meta":
        return torch.empty(shape, dtype=heads.dtype, device="meta")
    return torch.normal(0.0, ctx.init_std, shape, generator=ctx.generator()).to(heads.dtype)
