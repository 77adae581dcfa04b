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

from ..errors import ConversionError


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


@dataclass(frozen=True)
class LayerMethod:
    """A method that converts one layer's whole attention block (K, V and the compensating Q, O changes); see
    methods/layer.py. `fn(block, groups, ctx) -> LayerResult`. `pools`: it averages heads (so norm preservation
    applies); `calibrated`: the converter feeds it calibration activations by default."""

    fn: Callable
    pools: bool
    calibrated: bool
    doc: str

    def __call__(self, block, groups: int, ctx):
        return self.fn(block, groups, ctx)


LAYER_METHODS: dict[str, LayerMethod] = {}


def register_layer_method(name: str, *, pools: bool, calibrated: bool = False) -> Callable:
    def register(fn: Callable) -> Callable:
        LAYER_METHODS[name] = LayerMethod(fn, pools, calibrated, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return register


def all_method_names() -> list[str]:
    return sorted({*METHODS, *LAYER_METHODS})


def method_choices() -> str:
    """The registered methods, per-head ones first: 'first, mean, random, or a layer method: aligned, fit'."""
    return f"{', '.join(sorted(METHODS))}, or a layer method: {', '.join(sorted(LAYER_METHODS))}"


GROUPINGS = ("contiguous", "similarity")  # repeat_kv order, or the most alike heads together (methods/grouping.py)


def check_method(method: str, grouping: str = "contiguous", preserve_norm: bool = False) -> None:
    """A method, grouping and norm option that go together; a ConversionError naming the fix otherwise."""
    if method not in all_method_names():
        raise ConversionError(f"unknown method {method!r}; choose one of: {method_choices()}")
    if grouping not in GROUPINGS:
        raise ConversionError(f"unknown grouping {grouping!r}; choose one of: {', '.join(GROUPINGS)}")
    if preserve_norm and method in LAYER_METHODS and not LAYER_METHODS[method].pools:
        raise ConversionError(f"--preserve-norm applies to pooling methods (mean, first, random, aligned); "
                              f"{method!r} fits each head's scale itself, drop the option")


def get_method(name: str) -> Method | None:
    """The per-head method called `name`; None for a layer method (it runs through the per-layer plan)."""
    if name in LAYER_METHODS:
        return None
    if name not in METHODS:
        raise ConversionError(f"unknown method {name!r}; choose one of: {method_choices()}")
    return METHODS[name]


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
