"""Per-layer planning, for conversions that change Q and O with K and V (layer methods, similarity grouping).

Each layer's q, k, v, o tensors are produced together: the first one the writer asks for reads the layer's four
projections, runs `convert_layer` and keeps the results until the last is handed out, so memory stays at about
one layer. Output shapes are known up front (q and o keep theirs, k and v get G heads), as the writer needs.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping

import torch

from ..errors import ConversionError
from ..families.fused import Heads, fused_layout
from ..families.geometry import Geometry
from ..families.spec import ArchitectureSpec, key_pattern
from ..methods.layer import AttentionWeights, convert_layer
from .settings import ConversionSettings, LayerSettings
from .shared import SharedResult

ROLES = ("q", "k", "v", "o")


def _find(templates, names, suffix: str) -> dict[tuple[str, int], str]:
    """(prefix, layer) -> on-disk name, for the first template any name matches."""
    for template in templates:
        pattern = key_pattern(template + suffix)
        found = {(m["prefix"], int(m["layer"])): n for n in names if (m := pattern.match(n))}
        if found:
            return found
    return {}


def check_block_support(spec: ArchitectureSpec, model_type: str, names: list[str], what: str,
                        grouping: str = "contiguous") -> None:
    supported = sorted({t for s in _all_specs() for b in s.blocks for t in b.model_types})
    if grouping == "similarity" and any(b.position_bias_per_head for b in spec.blocks):
        raise ConversionError(f"--grouping similarity moves query heads, and {model_type} adds to its attention "
                              f"logits a bias that belongs to each head's position, so the moved heads would compute "
                              f"something else; use --grouping contiguous")
    for template in (t for block in spec.blocks for t in block.refuse_if_present):
        if found := _find([template], names, ""):
            raise ConversionError(f"{what} cannot convert {next(iter(found.values()))}: per-head query/key norms "
                                  f"do not commute with head rotations or permutations; use --method mean, first "
                                  f"or random with --grouping contiguous")
    if not spec.blocks or any(model_type not in block.model_types for block in spec.blocks):
        raise ConversionError(f"{what} changes Q and O with K and V and supports model types "
                              f"{', '.join(supported)}; {model_type!r} is not one (families without a tested "
                              f"layer spec are refused); use --method mean, first or random with --grouping "
                              f"contiguous")


def _all_specs():
    from ..families.spec import all_specs

    return all_specs().values()


def resized(shape: tuple[int, ...], rows: int, transposed: bool) -> tuple[int, ...]:
    """The shape with its output axis (the first, or the last of a transposed weight) set to `rows`."""
    return (*shape[:-1], rows) if transposed else (rows, *shape[1:])


def _split(layout: str, fused: torch.Tensor | None, geo: Geometry, kv_heads: int, kind: str) -> dict:
    """A fused q/k/v weight `[rows, d]` or bias `[rows]` -> q, k, v in nn.Linear's layout (`q_bias`... for biases)."""
    suffix = "" if kind == "weight" else "_bias"
    if fused is None:
        return {f"{r}{suffix}": None for r in "qkv"}
    heads = fused_layout(layout).split(fused, geo.heads, kv_heads, geo.head_dim)  # q (H, hd, ...), k, v (G0, hd, ...)
    return {f"{r}{suffix}": t.flatten(0, 1) for r, t in zip("qkv", heads)}


def _fuse(layout: str, q, k, v, geo: Geometry, groups: int) -> torch.Tensor | None:
    if q is None:
        return None
    hd = geo.head_dim
    return fused_layout(layout).fuse(Heads(q.view(geo.heads, hd, *q.shape[1:]), k.view(groups, hd, *k.shape[1:]),
                                           v.view(groups, hd, *v.shape[1:])))


def _converted_layer(names: dict[str, str | None], layer: int, read, geo: Geometry, settings,
                     layer_settings: LayerSettings) -> dict[str, torch.Tensor]:
    """One layer's q, k, v, o (weights and biases) by on-disk name, converted through `convert_layer`."""
    tensors = {role: read(n) if n is not None else None for role, n in names.items()}
    transposed = layer_settings.transposed
    if transposed:  # Conv1D weights `[in, out]`: to nn.Linear's layout and back afterwards
        tensors = {role: t.T if t is not None and not role.endswith("bias") else t for role, t in tensors.items()}
    layout = layer_settings.fused
    if layout is not None:  # one fused q/k/v tensor (and bias): split into the roles convert_layer takes
        tensors.update(_split(layout, tensors.pop("qkv"), geo, geo.kv_heads, "weight"))
        tensors.update(_split(layout, tensors.pop("qkv_bias"), geo, geo.kv_heads, "bias"))
    weights = AttentionWeights(tensors["q"], tensors["k"], tensors["v"], tensors["o"], tensors["q_bias"],
                               tensors["k_bias"], tensors["v_bias"])
    ls = layer_settings
    moments = ls.calibration[layer] if ls.calibration is not None else None
    key_moments = ls.key_calibration[layer] if ls.key_calibration is not None else None
    out = convert_layer(weights, heads=geo.heads, kv_heads=geo.kv_heads, groups=settings.groups,
                        method=ls.method, rope=ls.rope, grouping=ls.grouping, preserve_norm=ls.preserve_norm,
                        calibration=moments, key_calibration=key_moments, seed=settings.seed, init_std=geo.init_std,
                        names={f"{r.split('_')[0]}.{'bias' if r.endswith('bias') else 'weight'}": n
                               for r, n in names.items() if n is not None})
    if layout is None:
        result = {role: getattr(out, role) for role in names}
    else:
        result = {"qkv": _fuse(layout, out.q, out.k, out.v, geo, settings.groups),
                  "qkv_bias": _fuse(layout, out.q_bias, out.k_bias, out.v_bias, geo, settings.groups),
                  "o": out.o}
    if transposed:
        result = {role: t.T.contiguous() if t is not None and not role.endswith("bias") else t
                  for role, t in result.items()}
    return {n: result[role] for role, n in names.items() if n is not None}


def _source_shaped(by_name: dict[str, torch.Tensor], *, names: dict[str, str | None], geo: Geometry, groups: int,
                   layer_settings: LayerSettings) -> dict[str, torch.Tensor]:
    """A converted layer's tensors by on-disk name, shaped as the source's: K/V (split out of a fused qkv by its
    layout) repeated from G heads back to the source's G0, group j serving the contiguous heads it replaced. The
    source's MHA-shaped block holding them computes the converted attention (sequential calibration runs it)."""
    def to_source_heads(t: torch.Tensor) -> torch.Tensor:
        heads = t.reshape(groups, geo.head_dim, *t.shape[1:])  # (G, hd, ...)
        return heads.repeat_interleave(geo.kv_heads // groups, 0).flatten(0, 1)  # (G0 * hd, ...)

    shaped = {}
    for role, name in names.items():
        if name is None:
            continue
        t = by_name[name]
        if role[0] in "kv" or role.startswith("qkv"):
            flip = layer_settings.transposed and not role.endswith("bias")  # Conv1D `[in, out]`: rows first
            t = t.T if flip else t
            if role.startswith("qkv"):
                layout = layer_settings.fused
                q, k, v = _split(layout, t, geo, groups, "bias" if role.endswith("bias") else "weight").values()
                t = _fuse(layout, q, to_source_heads(k), to_source_heads(v), geo, geo.kv_heads)
            else:
                t = to_source_heads(t)
            t = t.T if flip else t
        shaped[name] = t
    return shaped


def plan_layers(sources: Mapping, read, geo: Geometry, settings: ConversionSettings,
                layer_settings: LayerSettings) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable]]:
    """On-disk name -> (output shape, dtype, producer) for every q, k, v, o weight and q, k, v bias of every layer
    of one block."""
    block = layer_settings.block
    names = list(sources)
    roles = ("qkv", "o") if block.qkv else ROLES
    biased = ("qkv",) if block.qkv else ("q", "k", "v")
    found = {role: _find(getattr(block, role), names, ".weight") for role in roles}
    found.update({f"{role}_bias": _find(getattr(block, role), names, ".bias") for role in biased})
    layers = sorted(found[roles[-2]])  # k, or the fused qkv
    if [layer for _, layer in layers] != list(range(geo.num_layers)):
        raise ConversionError(f"found k projections for layers {[l for _, l in layers][:8]} but config.json has "
                              f"{geo.num_layers} layers; the weight files do not match config.json")
    planned = {}
    converted = layer_settings.converted
    rows = settings.groups * geo.head_dim
    fused_rows = fused_layout(block.fused_layout).rows(geo.heads, settings.groups, geo.head_dim) \
        if block.qkv else None
    for key in layers:
        group_names = {role: found[role].get(key) for role in found}
        missing = [r for r in roles if group_names[r] is None]
        if missing:
            raise ConversionError(f"layer {key[1]} has no {' or '.join(missing)} projection among "
                                  f"{[getattr(block, r) for r in missing]}")
        group = SharedResult(partial(_converted_layer, group_names, key[1], read, geo, settings, layer_settings),
                             [n for n in group_names.values() if n is not None],
                             on_computed=partial(converted.hold, key[1], partial(
                                 _source_shaped, names=group_names, geo=geo, groups=settings.groups,
                                 layer_settings=layer_settings)) if converted else None)
        if converted is not None:
            converted.groups[key[1]] = group
        for role, name in group_names.items():
            if name is None:
                continue
            shape = tuple(sources[name].shape)
            if role.startswith("qkv"):
                shape = resized(shape, fused_rows, block.transposed and role == "qkv")
            elif role[0] in "kv":
                shape = resized(shape, rows, block.transposed and not role.endswith("bias"))
            dtype = settings.output_dtype(sources[name].dtype)
            planned[name] = (shape, dtype, group.producer(name, dtype))
    return planned
