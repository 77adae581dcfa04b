"""The conversion plan: the attention units to convert and every output tensor's name, dtype and shape, known
before any data is read.

An attention unit is one attention kind in one layer (llama's self-attention in layer 3; t5's cross-attention in
decoder block 5): the K/V tensors the spec names there and, for the layer methods, its q, k, v, o projections
(or the fused one). Every other tensor is copied, byte for byte where its dtype stays. Because every shape is
known up front, the writer lays out shard headers before any data, and a 70B-shaped plan can be checked on the
meta device with no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..errors import ConversionError
from gqa_toolkit.families.fused import fused_layout
from gqa_toolkit.families.geometry import Geometry
from gqa_toolkit.families.spec import ArchitectureSpec, AttentionBlock, KVTensor, NativeTarget, key_pattern
from ..io.tensors import OutputTensor, SourceTensor

ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class KVTensors:
    """One spec entry's tensor in one unit: its name, or a stacked entry's names, one per KV head in head order."""

    entry: KVTensor
    names: tuple[str, ...]


@dataclass(frozen=True)
class AttentionUnit:
    kind: str  # the spec's attention kind
    layer: int
    geometry: Geometry
    groups: int  # G, this unit's KV heads in the output (its kind's)
    kv: tuple[KVTensors, ...]  # every K/V tensor the spec names in this unit (per-head methods convert these)
    # the layer methods: role (q, k, v, o, q_bias, k_bias, v_bias; or qkv, qkv_bias, o) -> on-disk name or None
    projections: Mapping[str, str | None] | None = None
    block: AttentionBlock | None = None

    @property
    def names(self) -> list[str]:
        """Every on-disk tensor the unit reads."""
        if self.projections is not None:
            return [n for n in self.projections.values() if n is not None]
        return [n for kv in self.kv for n in kv.names]


@dataclass(frozen=True)
class Plan:
    outputs: tuple[OutputTensor, ...]  # every output tensor, in the source's order: the writer's layout
    units: tuple[AttentionUnit, ...]  # in the source's order of their tensors
    transposed: frozenset[str]  # copied tensors the native target stores the other way round ([in, out] -> [out, in])

    def copied(self) -> list[OutputTensor]:
        """The outputs outside every unit that the loop reads and writes itself (a new dtype, or transposed)."""
        inside = {n for unit in self.units for n in unit.names}
        return [t for t in self.outputs if t.copy_from is None and t.name not in inside]


@dataclass(frozen=True)
class _Match:
    entry: KVTensor
    layer: int
    head: int | None
    prefix: str


def _match_names(names: Iterable[str], entries: Iterable[KVTensor]) -> dict[str, _Match]:
    patterns = [(entry, key_pattern(entry.key)) for entry in entries]
    matches = {}
    for name in names:
        for entry, pattern in patterns:
            if m := pattern.match(name):
                head = int(m["head"]) if "head" in pattern.groupindex else None
                matches[name] = _Match(entry, int(m["layer"]), head, m["prefix"])
                break
    return matches


def kv_rows(layout: str, fused: str | None, geo: Geometry, kv_heads: int) -> int | None:
    """The leading size of a K/V tensor holding `kv_heads` heads: `rows` G*hd, `heads` G, `fused` by its layout;
    None for `stacked` (one tensor per head)."""
    if layout == "rows":
        return kv_heads * geo.head_dim
    if layout == "heads":
        return kv_heads
    if layout == "fused":
        return fused_layout(fused).rows(geo.heads, kv_heads, geo.head_dim)
    return None


def _rows_axis(transposed: bool) -> int:
    return -1 if transposed else 0


def _output_shape(shape: tuple[int, ...], rows: int | None, transposed: bool, rows_first: bool) -> tuple[int, ...]:
    """A K/V tensor's shape with `rows` on its head axis (the first, or the last of a transposed weight); with
    `rows_first` (a native target's nn.Linear) the head axis moves first."""
    if rows is None:
        return shape
    if transposed and rows_first:
        return (rows, *shape[:-1])
    return (*shape[:-1], rows) if transposed else (rows, *shape[1:])


def _validate(sources: Mapping[str, SourceTensor], matches: dict[str, _Match], entries: list[KVTensor],
              geos: Mapping[str, Geometry]) -> None:
    """Every required K/V tensor present for every layer, and every K/V shape consistent with the config."""
    for entry in entries:
        geo = geos[entry.attention]
        layers = {m.layer for m in matches.values() if m.entry is entry}
        if beyond := sorted(layer for layer in layers if layer >= geo.num_layers)[:5]:
            raise ConversionError(f"the weights hold {entry.key!r} for layers {beyond} beyond the config's "
                                  f"{geo.num_layers}; the weight files do not match config.json's layer count")
        if entry.required and layers != set(range(geo.num_layers)):
            missing = sorted(set(range(geo.num_layers)) - layers)[:5]
            raise ConversionError(f"the weights have no {entry.key!r} for layers {missing} of the config's "
                                  f"{geo.num_layers}; the weight files do not match config.json")
    for name, m in matches.items():
        shape, geo = sources[name].shape, geos[m.entry.attention]
        rows = kv_rows(m.entry.layout, m.entry.fused_layout, geo, geo.kv_heads)
        bad_rows = rows is not None and (not shape or shape[_rows_axis(m.entry.transposed)] != rows)
        bad_head = m.head is not None and m.head >= geo.kv_heads
        if bad_rows or bad_head:
            expected = f"{rows} rows" if rows is not None else f"a head index below {geo.kv_heads}"
            raise ConversionError(f"{name} has shape {list(shape)} but config.json ({geo.heads} heads, "
                                  f"{geo.kv_heads} KV heads, head_dim {geo.head_dim}) implies {expected}; the weights "
                                  f"and config.json disagree")


def _kv_units(matches: dict[str, _Match], geos: Mapping[str, Geometry]) -> dict[tuple, list[KVTensors]]:
    """(kind, prefix, layer) -> the unit's K/V tensors, a stacked entry's per-head tensors together."""
    by_unit: dict[tuple, dict[KVTensor, dict]] = {}
    for name, m in matches.items():
        entries = by_unit.setdefault((m.entry.attention, m.prefix, m.layer), {})
        entries.setdefault(m.entry, {})[m.head] = name
    units = {}
    for key, entries in by_unit.items():
        geo = geos[key[0]]
        for entry, by_head in entries.items():
            if entry.layout == "stacked" and sorted(by_head) != list(range(geo.kv_heads)):
                raise ConversionError(f"{next(iter(by_head.values()))}: expected one {entry.key!r} per KV head "
                                      f"(0..{geo.kv_heads - 1}), found heads {sorted(by_head)}")
        units[key] = [KVTensors(entry, tuple(by_head[h] for h in sorted(by_head, key=lambda h: h or 0)))
                      for entry, by_head in entries.items()]
    return units


def _find(templates, names, suffix: str) -> dict[tuple[str, int], str]:
    """(prefix, layer) -> on-disk name, for the first template any name matches."""
    for template in templates:
        pattern = key_pattern(template + suffix)
        found = {(m["prefix"], int(m["layer"])): n for n in names if (m := pattern.match(n))}
        if found:
            return found
    return {}


def _projections(block: AttentionBlock, names: list[str], geo: Geometry) -> dict[tuple, dict[str, str | None]]:
    """(prefix, layer) -> role -> on-disk name, for every layer of one block."""
    roles = ("qkv", "o") if block.qkv else ROLES
    biased = ("qkv",) if block.qkv else ("q", "k", "v")
    found = {role: _find(getattr(block, role), names, ".weight") for role in roles}
    found.update({f"{role}_bias": _find(getattr(block, role), names, ".bias") for role in biased})
    layers = sorted(found[roles[-2]])  # k, or the fused qkv
    if [layer for _, layer in layers] != list(range(geo.num_layers)):
        raise ConversionError(f"found k projections for layers {[l for _, l in layers][:8]} but config.json has "
                              f"{geo.num_layers} layers; the weight files do not match config.json")
    by_layer = {}
    for key in layers:
        projections = {role: found[role].get(key) for role in found}
        if missing := [r for r in roles if projections[r] is None]:
            raise ConversionError(f"layer {key[1]} has no {' or '.join(missing)} projection among "
                                  f"{[getattr(block, r) for r in missing]}")
        by_layer[key] = projections
    return by_layer


def check_layer_support(spec: ArchitectureSpec, model_type: str, names: list[str], what: str,
                        grouping: str = "contiguous") -> None:
    """The layer methods and similarity grouping run on this family and checkpoint; a ConversionError naming the
    fix otherwise."""
    from gqa_toolkit.families.spec import all_specs

    supported = sorted({t for s in all_specs().values() for b in s.blocks for t in b.model_types})
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


def plan_conversion(sources: Mapping[str, SourceTensor], spec: ArchitectureSpec,
                    geo: Geometry | Mapping[str, Geometry], groups: int | Mapping[str, int], *,
                    dtype: torch.dtype | None = None, per_layer: bool = False,
                    native: NativeTarget | None = None) -> Plan:
    """`geo`: one geometry for every attention kind, or kind -> geometry for the kinds to convert (tensors of the
    other kinds are copied unchanged: T5's encoder under the default scope). `groups`: G for every kind, or kind ->
    its G. `per_layer`: the units convert q, k, v and o together (layer methods, similarity grouping). `dtype`:
    floating outputs' dtype (None keeps each's)."""
    geos = dict(geo) if isinstance(geo, Mapping) else {kind: geo for kind in spec.attention}
    kind_groups = dict(groups) if isinstance(groups, Mapping) else {kind: groups for kind in geos}
    entries = [t for t in spec.tensors if t.attention in geos]
    names = list(sources)
    matches = _match_names(names, entries)
    _validate(sources, matches, entries, geos)
    kv_units = _kv_units(matches, geos)
    projections = {}
    if per_layer:
        for block in (b for b in spec.blocks if b.attention in geos):
            for (prefix, layer), roles in _projections(block, names, geos[block.attention]).items():
                projections[(block.attention, prefix, layer)] = (block, roles)
    units = [AttentionUnit(key[0], key[2], geos[key[0]], kind_groups[key[0]], tuple(kv_units.get(key, ())),
                           *reversed(projections.get(key, (None, None))))
             for key in {*kv_units, *projections}]
    order = {name: i for i, name in enumerate(names)}
    units.sort(key=lambda unit: min(order[n] for n in [*unit.names, *(n for kv in unit.kv for n in kv.names)]))
    for unit in units if per_layer else ():
        if outside := [n for kv in unit.kv for n in kv.names if n not in (unit.projections or {}).values()]:
            raise ConversionError(f"{outside[0]} holds K/V heads that the per-layer conversion does not reach; this "
                                  f"family's spec needs its block section to cover it")
    transposed = frozenset(n for n in names if n not in matches and native is not None
                           and any(key_pattern(t).match(n) for t in native.transpose))
    return Plan(tuple(_outputs(sources, matches, units, transposed, dtype, native is not None)),
                tuple(units), transposed)


def _projection_rows(units: Iterable[AttentionUnit]) -> dict[str, tuple[int | None, bool]]:
    """A layer unit's tensors -> (their rows in the output, None where q and o keep theirs; whether the head axis
    is the last, as in a Conv1D weight)."""
    shaped = {}
    for unit in (u for u in units if u.projections is not None):
        for role, name in unit.projections.items():
            if name is None:
                continue
            rows = kv_rows("fused", unit.block.fused_layout, unit.geometry, unit.groups) if role.startswith("qkv") \
                else kv_rows("rows", None, unit.geometry, unit.groups) if role[0] in "kv" else None
            shaped[name] = rows, unit.block.transposed and not role.endswith("bias")
    return shaped


def _outputs(sources, matches, units, transposed, dtype, rows_first: bool) -> Iterable[OutputTensor]:
    unit_of = {name: unit for unit in units for name in unit.names}
    projections = _projection_rows(units)
    for name, source in sources.items():
        out_dtype = dtype if dtype is not None and source.dtype.is_floating_point else source.dtype
        shape, m = tuple(source.shape), matches.get(name)
        if name in transposed:
            yield OutputTensor(name, out_dtype, shape[::-1])
        elif name in projections:
            yield OutputTensor(name, out_dtype, _output_shape(shape, *projections[name], rows_first=False))
        elif m is not None:
            unit = unit_of[name]
            if m.head is not None and m.head >= unit.groups:
                continue  # a stacked entry keeps one tensor per output KV head
            rows = kv_rows(m.entry.layout, m.entry.fused_output_layout or m.entry.fused_layout, unit.geometry,
                           unit.groups)
            yield OutputTensor(name, out_dtype, _output_shape(shape, rows, m.entry.transposed, rows_first))
        else:
            yield OutputTensor(name, out_dtype, shape, source.span if out_dtype == source.dtype else None)
