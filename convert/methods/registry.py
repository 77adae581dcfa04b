"""The conversion methods by name: per-head methods (per_head.py) and layer methods (alignment.py, fitting.py).

A new method is a decorated function, and the CLI lists whatever is registered. The built-in methods are named
here and imported on first use, so that naming them (a command's --help) needs no torch.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from ..errors import ConversionError

if TYPE_CHECKING:
    import torch

# name -> the module of this package that registers it
BUILTIN_PER_HEAD = {"mean": "per_head", "first": "per_head", "random": "per_head"}
BUILTIN_LAYER = {"aligned": "alignment", "fit": "fitting"}


@dataclass(frozen=True)
class MethodContext:
    """What a method may need besides the heads: how the family initialises this tensor, and a seed."""

    name: str  # on-disk tensor name (with the part, for fused tensors), to derive a per-tensor seed
    init: str  # "normal" | "zeros" | "ones"
    init_std: float
    seed: int

    def generator(self) -> torch.Generator:
        import torch

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
    """A method that converts one layer's whole attention (K, V and the compensating Q, O changes); see
    methods/layer.py. `fn(per_head, groups, ctx) -> LayerResult`. `pools`: it averages heads (so norm preservation
    applies); `calibrated`: the converter feeds it calibration activations by default."""

    fn: Callable
    pools: bool
    calibrated: bool
    doc: str

    def __call__(self, per_head, groups: int, ctx):
        return self.fn(per_head, groups, ctx)


LAYER_METHODS: dict[str, LayerMethod] = {}


def register_layer_method(name: str, *, pools: bool, calibrated: bool = False) -> Callable:
    def register(fn: Callable) -> Callable:
        LAYER_METHODS[name] = LayerMethod(fn, pools, calibrated, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return register


def _load_builtins() -> None:
    for module in {*BUILTIN_PER_HEAD.values(), *BUILTIN_LAYER.values()}:
        importlib.import_module(f".{module}", __package__)


def per_head_methods() -> dict[str, Method]:
    _load_builtins()
    return METHODS


def layer_methods() -> dict[str, LayerMethod]:
    _load_builtins()
    return LAYER_METHODS


def method_summary(name: str) -> str:
    """A method's first docstring line, without its parenthesis or full stop: 'Average the heads of each group'."""
    layer = layer_methods().get(name)
    doc = layer.doc if layer is not None else (per_head_methods()[name].__doc__ or "").strip().split("\n")[0]
    return doc.split(" (")[0].rstrip(".")


def all_method_names() -> list[str]:
    return sorted({*BUILTIN_PER_HEAD, *BUILTIN_LAYER, *METHODS, *LAYER_METHODS})


def method_choices() -> str:
    """The methods, per-head ones first: 'first, mean, random, or a layer method: aligned, fit'."""
    per_head, layer = sorted({*BUILTIN_PER_HEAD, *METHODS}), sorted({*BUILTIN_LAYER, *LAYER_METHODS})
    return f"{', '.join(per_head)}, or a layer method: {', '.join(layer)}"


GROUPINGS = ("contiguous", "similarity")  # repeat_kv order, or the most alike heads together (methods/grouping.py)
REFINE_PRECISIONS = ("auto", "bf16", "fp32")  # refinement's arithmetic (refinement.resolve_precision)


def check_method(method: str, grouping: str = "contiguous", preserve_norm: bool = False) -> None:
    """A method, grouping and norm option that go together; a ConversionError naming the fix otherwise."""
    if method not in all_method_names():
        raise ConversionError(f"unknown method {method!r}; choose one of: {method_choices()}")
    if grouping not in GROUPINGS:
        raise ConversionError(f"unknown grouping {grouping!r}; choose one of: {', '.join(GROUPINGS)}")
    layer = layer_methods().get(method)
    if preserve_norm and layer is not None and not layer.pools:
        raise ConversionError(f"--preserve-norm applies to pooling methods (mean, first, random, aligned); "
                              f"{method!r} fits each head's scale itself, drop the option")


def get_method(name: str) -> Method | None:
    """The per-head method called `name`; None for a layer method (it runs through the per-layer plan)."""
    if name in layer_methods():
        return None
    if name not in METHODS:
        raise ConversionError(f"unknown method {name!r}; choose one of: {method_choices()}")
    return METHODS[name]
