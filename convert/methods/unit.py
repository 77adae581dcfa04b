"""One attention unit converted: its on-disk tensors in, the output's tensors out, by on-disk name.

The per-head methods (mean, first, random) pool each K/V tensor the spec names (weights, biases, k_norm scales;
fused q/k/v split and re-fused by the family's layout) and leave Q and O alone. The layer methods and similarity
grouping read the unit's q, k, v and o and run `convert_layer`, which also changes Q and O. Arithmetic runs in
float32 (float64 inside the layer methods); the writer stores the planned dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from gqa_toolkit.families.fused import Heads, fused_layout
from gqa_toolkit.families.geometry import Geometry
from gqa_toolkit.families.rope import RopeLayout
from ..plan.planner import AttentionUnit, KVTensors
from .layer import AttentionWeights, convert_layer
from .layer_types import InputMoments
from .per_head import pool_heads
from .registry import MethodContext

Read = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class UnitConversion:
    """How every unit of a conversion is converted."""

    method: str
    seed: int = 0
    grouping: str = "contiguous"
    preserve_norm: bool = False
    per_layer: bool = False  # q, k, v and o together (a layer method, or similarity grouping)
    rows_first: bool = False  # a native target's transposed weights are written rows first (nn.Linear)
    ropes: Mapping[str, RopeLayout] = field(default_factory=dict)  # attention kind -> its RoPE, for layer methods


def convert_unit(unit: AttentionUnit, read: Read, how: UnitConversion, moments: InputMoments | None = None,
                 key_moments: InputMoments | None = None) -> dict[str, torch.Tensor]:
    """`moments`: the unit's attention input (Q's); `key_moments`: K's and V's where they differ (cross-attention)."""
    if how.per_layer:
        return _layer_unit(unit, read, how, moments, key_moments)
    return {name: t for kv in unit.kv for name, t in _per_head_tensor(kv, read, unit, how).items()}


def _pool(heads: torch.Tensor, kv: KVTensors, name: str, how: UnitConversion, unit: AttentionUnit) -> torch.Tensor:
    """(G0, ...) -> (G, ...) by the per-head method; norm scales (init ones) are never rescaled."""
    context = MethodContext(name, kv.entry.init, unit.geometry.init_std, how.seed)
    return pool_heads(heads.float(), unit.groups, how.method, context,
                      preserve_norm=how.preserve_norm and kv.entry.init != "ones")


def _per_head_tensor(kv: KVTensors, read: Read, unit: AttentionUnit, how: UnitConversion) -> dict[str, torch.Tensor]:
    entry, geo = kv.entry, unit.geometry
    rows_axis = -1 if entry.transposed else 0
    out_axis = 0 if how.rows_first else rows_axis
    if entry.layout == "stacked":
        stack = torch.stack([read(n) for n in kv.names])  # (G0, *shape)
        pooled = _pool(stack, kv, kv.names[0], how, unit)  # (G, *shape)
        return {kv.names[h]: pooled[h] for h in range(unit.groups)}
    name = kv.names[0]
    t = read(name).float().movedim(rows_axis, 0)  # rows first
    if entry.layout == "fused":
        q, k, v = fused_layout(entry.fused_layout).split(t, geo.heads, geo.kv_heads, geo.head_dim)
        k, v = _pool(k, kv, f"{name}:k", how, unit), _pool(v, kv, f"{name}:v", how, unit)  # (G, hd, *rest)
        out = fused_layout(entry.fused_output_layout or entry.fused_layout).fuse(Heads(q, k, v))  # (rows, *rest)
    else:
        heads = t.reshape(geo.kv_heads, -1, *t.shape[1:])  # (G0, hd or 1, *rest)
        out = _pool(heads, kv, name, how, unit).flatten(0, 1)  # (G * (hd or 1), *rest)
    return {name: out.movedim(0, out_axis).contiguous()}


def _split(layout: str, fused: torch.Tensor | None, geo: Geometry, kv_heads: int, kind: str) -> dict:
    """A fused q/k/v weight `[rows, d]` or bias `[rows]` -> q, k, v in nn.Linear's layout (`q_bias`... for biases)."""
    suffix = "" if kind == "weight" else "_bias"
    if fused is None:
        return {f"{r}{suffix}": None for r in "qkv"}
    heads = fused_layout(layout).split(fused, geo.heads, kv_heads, geo.head_dim)  # q (H, hd, ...), k, v (G0, hd, ...)
    return {f"{r}{suffix}": t.flatten(0, 1) for r, t in zip("qkv", heads)}


def _fuse(layout: str, q, k, v, geo: Geometry, kv_heads: int) -> torch.Tensor | None:
    if q is None:
        return None
    hd = geo.head_dim
    return fused_layout(layout).fuse(Heads(q.view(geo.heads, hd, *q.shape[1:]), k.view(kv_heads, hd, *k.shape[1:]),
                                           v.view(kv_heads, hd, *v.shape[1:])))


def _layer_unit(unit: AttentionUnit, read: Read, how: UnitConversion, moments, key_moments) -> dict[str, torch.Tensor]:
    """The unit's q, k, v, o (weights and biases) converted through `convert_layer`."""
    names, block, geo = unit.projections, unit.block, unit.geometry
    tensors = {role: read(n) if n is not None else None for role, n in names.items()}
    if block.transposed:  # Conv1D weights `[in, out]`: to nn.Linear's layout and back afterwards
        tensors = {role: t.T if t is not None and not role.endswith("bias") else t for role, t in tensors.items()}
    layout = block.fused_layout
    if layout is not None:  # one fused q/k/v tensor (and bias): split into the roles convert_layer takes
        tensors.update(_split(layout, tensors.pop("qkv"), geo, geo.kv_heads, "weight"))
        tensors.update(_split(layout, tensors.pop("qkv_bias"), geo, geo.kv_heads, "bias"))
    weights = AttentionWeights(tensors["q"], tensors["k"], tensors["v"], tensors["o"], tensors["q_bias"],
                               tensors["k_bias"], tensors["v_bias"])
    out = convert_layer(weights, heads=geo.heads, kv_heads=geo.kv_heads, groups=unit.groups, method=how.method,
                        rope=how.ropes[unit.kind], grouping=how.grouping, preserve_norm=how.preserve_norm,
                        calibration=moments, key_calibration=key_moments, seed=how.seed, init_std=geo.init_std,
                        names={f"{r.split('_')[0]}.{'bias' if r.endswith('bias') else 'weight'}": n
                               for r, n in names.items() if n is not None})
    if layout is None:
        result = {role: getattr(out, role) for role in names}
    else:
        result = {"qkv": _fuse(layout, out.q, out.k, out.v, geo, unit.groups),
                  "qkv_bias": _fuse(layout, out.q_bias, out.k_bias, out.v_bias, geo, unit.groups), "o": out.o}
    if block.transposed:
        result = {role: t.T.contiguous() if t is not None and not role.endswith("bias") else t
                  for role, t in result.items()}
    return {n: result[role] for role, n in names.items() if n is not None}


def source_shaped(unit: AttentionUnit, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A converted layer unit's tensors by on-disk name, shaped as the source's: K/V (split out of a fused qkv by
    its layout) repeated from G heads back to the source's G0, group j serving the contiguous heads it replaced.
    The source's MHA-shaped block holding them computes the converted attention (sequential calibration runs it)."""
    geo, block, groups = unit.geometry, unit.block, unit.groups

    def to_source_heads(t: torch.Tensor) -> torch.Tensor:
        heads = t.reshape(groups, geo.head_dim, *t.shape[1:])  # (G, hd, ...)
        return heads.repeat_interleave(geo.kv_heads // groups, 0).flatten(0, 1)  # (G0 * hd, ...)

    shaped = {}
    for role, name in unit.projections.items():
        if name is None:
            continue
        t = converted[name]
        if role[0] in "kv" or role.startswith("qkv"):
            flip = block.transposed and not role.endswith("bias")  # Conv1D `[in, out]`: rows first
            t = t.T if flip else t
            if role.startswith("qkv"):
                q, k, v = _split(block.fused_layout, t, geo, groups, "bias" if role.endswith("bias") else "weight")\
                    .values()
                t = _fuse(block.fused_layout, q, to_source_heads(k), to_source_heads(v), geo, geo.kv_heads)
            else:
                t = to_source_heads(t)
            t = t.T if flip else t
        shaped[name] = t
    return shaped
