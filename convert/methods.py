"""K/V initialisers for the grouped heads, behind a registry.

Each method is a pure function from the source's per-head tensor `(G0, ...)` to the grouped one `(G, ...)`, with
groups contiguous: source head j belongs to group j // (G0/G), the `repeat_kv` convention. Arithmetic runs in
float32; the caller casts back to the checkpoint's dtype. A new method is a decorated function: the CLI lists
whatever is registered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .errors import ConversionError


@dataclass(frozen=True)
class MethodContext:
    """What a method may need besides the heads: how the family initialises this tensor, and a seed."""

    name: str  # on-disk tensor name (with the part, for fused tensors), to derive a per-tensor seed
    init: str  # "normal" | "zeros" | "ones"
    init_std: float
    seed: int

    def generator(self) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{self.name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class Method(Protocol):
    def __call__(self, heads: torch.Tensor, groups: int, ctx: MethodContext) -> torch.Tensor: ...


METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    def register(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return register


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConversionError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


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
