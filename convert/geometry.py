"""Attention geometry read from a model config: layers, query heads, KV heads, head size, init scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .architectures.spec import ArchitectureSpec
from .errors import ConversionError


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    heads: int  # H, query heads
    kv_heads: int  # G0, the source's KV heads
    head_dim: int  # hd
    init_std: float  # the family's initializer_range, for the `random` method


def read_geometry(config: Any, spec: ArchitectureSpec, kind: str | None = None) -> Geometry:
    """`config` is a transformers PretrainedConfig (attribute maps and defaults applied); `kind` one of the spec's
    attention kinds (default: its first)."""
    kind = kind or next(iter(spec.attention))
    for attr, wanted in spec.requires.items():
        found = getattr(config, attr, None)
        if found != wanted:
            raise ConversionError(f"{config.model_type} conversion needs {attr}={wanted!r} in config.json, found "
                                  f"{found!r}: this checkpoint's attention layout is not one the family's config "
                                  f"can give fewer KV heads")
    heads = config.num_attention_heads
    kv_attr = spec.kv_heads_attr_of(kind)
    # A family converted through the toolkit's modeling code is MHA unless the source already runs that code: the
    # stock modeling ignores any KV-head count its config.json happens to hold.
    counts_kv_heads = spec.modeling is None or config.model_type == spec.modeling.model_type
    kv_heads = (getattr(config, kv_attr, None) if kv_attr and counts_kv_heads else None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(
        num_layers=getattr(config, spec.attention[kind].layers_attr),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        init_std=float(getattr(config, "initializer_range", 0.02)),
    )


def read_geometries(config: Any, spec: ArchitectureSpec, scope: str | None = None) -> dict[str, Geometry]:
    """Attention kind -> geometry, for the kinds that `scope` converts."""
    return {kind: read_geometry(config, spec, kind) for kind in spec.kinds(scope)}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_groups(groups: int, geometry: Geometry, spec: ArchitectureSpec) -> None:
    """G must divide the current KV head count and not exceed it; some families can express only some G."""
    G0 = geometry.kv_heads
    valid = [g for g in divisors(G0) if spec.only_groups is None or g in spec.only_groups]
    if groups > G0:
        raise ConversionError(f"--groups {groups} is more than the checkpoint's {G0} KV heads; conversion can only "
                              f"share heads, choose one of: {', '.join(map(str, valid))}")
    if groups < 1 or G0 % groups:
        raise ConversionError(f"--groups {groups} does not divide the checkpoint's {G0} KV heads; choose one of: "
                              f"{', '.join(map(str, valid))}")
    if groups not in valid:
        raise ConversionError(f"this family's config can only express {', '.join(map(str, valid))} KV heads, "
                              f"not {groups}; choose one of: {', '.join(map(str, valid))}")
