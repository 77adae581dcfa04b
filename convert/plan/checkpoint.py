"""The conversion plan: every output tensor's name, dtype and shape, known before any data is read.

Planning matches on-disk names against the family's spec, checks every K/V shape against the config, and gives
each output tensor a `produce()` that reads its source tensor(s) and applies the method. Because shapes are known
up front, the writer can lay out shard headers before streaming data, and a 70B-shaped plan can be checked on
the meta device with no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from ..errors import ConversionError
from ..families.fused import Heads, fused_layout
from ..families.geometry import Geometry
from ..families.spec import ArchitectureSpec, KVTensor, key_pattern
from ..io.tensors import PlannedTensor, SourceTensor
from ..methods.per_head import preserve_norms
from ..methods.registry import MethodContext
from .layers import plan_layers, resized
from .settings import ConversionSettings
from .shared import SharedResult


@dataclass(frozen=True)
class Match:
    entry: KVTensor
    layer: int
    head: int | None
    prefix: str


def match_names(names: list[str], entries: Iterable[KVTensor]) -> dict[str, Match]:
    patterns = [(entry, key_pattern(entry.key)) for entry in entries]
    matches = {}
    for name in names:
        for entry, pattern in patterns:
            if m := pattern.match(name):
                head = int(m["head"]) if "head" in pattern.groupindex else None
                matches[name] = Match(entry, int(m["layer"]), head, m["prefix"])
                break
    return matches


def _expected_rows(entry: KVTensor, geo: Geometry, kv_heads: int, output: bool) -> int | None:
    if entry.layout == "rows":
        return kv_heads * geo.head_dim
    if entry.layout == "heads":
        return kv_heads
    if entry.layout == "fused":
        name = entry.fused_output_layout if output and entry.fused_output_layout else entry.fused_layout
        return fused_layout(name).rows(geo.heads, kv_heads, geo.head_dim)
    return None  # stacked: one tensor per head


def _rows_axis(entry: KVTensor) -> int:
    return -1 if entry.transposed else 0


def _output_rows_axis(entry: KVTensor, settings: ConversionSettings) -> int:
    """Where the head rows go in the output: as in the source, or first for a native target's nn.Linear."""
    return 0 if settings.native is not None else _rows_axis(entry)


def validate(sources: Mapping[str, SourceTensor], matches: dict[str, Match], entries: Iterable[KVTensor],
             geos: Mapping[str, Geometry]) -> None:
    """Every required K/V tensor present for every layer, and every K/V shape consistent with the config."""
    for entry in entries:
        geo = geos[entry.attention]
        layers = {m.layer for m in matches.values() if m.entry is entry}
        if entry.required and layers != set(range(geo.num_layers)):
            missing = sorted(set(range(geo.num_layers)) - layers)[:5]
            raise ConversionError(f"the weights have no {entry.key!r} for layers {missing} of the config's "
                                  f"{geo.num_layers}; the weight files do not match config.json")
    for name, m in matches.items():
        shape, geo = sources[name].shape, geos[m.entry.attention]
        rows = _expected_rows(m.entry, geo, geo.kv_heads, output=False)
        bad_rows = rows is not None and (not shape or shape[_rows_axis(m.entry)] != rows)
        bad_head = m.head is not None and m.head >= geo.kv_heads
        if bad_rows or bad_head:
            expected = f"{rows} rows" if rows is not None else f"a head index below {geo.kv_heads}"
            raise ConversionError(f"{name} has shape {list(shape)} but config.json ({geo.heads} heads, "
                                  f"{geo.kv_heads} KV heads, head_dim {geo.head_dim}) implies {expected}; the weights "
                                  f"and config.json disagree")


def _convert_heads(heads: torch.Tensor, entry: KVTensor, name: str, geo: Geometry,
                   settings: ConversionSettings) -> torch.Tensor:
    ctx = MethodContext(name=name, init=entry.init, init_std=geo.init_std, seed=settings.seed)
    pooled = settings.method(heads.float(), settings.groups, ctx)
    if settings.preserve_norm and entry.init != "ones" and heads.device.type != "meta":
        pooled = preserve_norms(heads.float(), pooled, settings.groups)  # weights and biases, not norm scales
    return pooled


def _rows_producer(name: str, entry: KVTensor, read, geo: Geometry, settings, dtype) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        t = read(name).movedim(_rows_axis(entry), 0)  # rows first
        heads = t.reshape(geo.kv_heads, -1, *t.shape[1:])  # (G0, hd or 1, *rest)
        out = _convert_heads(heads, entry, name, geo, settings)  # (G, hd or 1, *rest)
        return out.flatten(0, 1).movedim(0, _output_rows_axis(entry, settings)).contiguous().to(dtype)

    return produce


def _fused_producer(name: str, entry: KVTensor, read, geo: Geometry, settings, dtype) -> Callable[[], torch.Tensor]:
    source_layout = fused_layout(entry.fused_layout)
    output_layout = fused_layout(entry.fused_output_layout or entry.fused_layout)

    def produce() -> torch.Tensor:
        fused = read(name).float().movedim(_rows_axis(entry), 0)  # rows first
        q, k, v = source_layout.split(fused, geo.heads, geo.kv_heads, geo.head_dim)
        k = _convert_heads(k, entry, f"{name}:k", geo, settings)  # (G, hd, *rest)
        v = _convert_heads(v, entry, f"{name}:v", geo, settings)
        out = output_layout.fuse(Heads(q, k, v))  # (rows, *rest)
        return out.movedim(0, _output_rows_axis(entry, settings)).contiguous().to(dtype)

    return produce


def _stacked_heads(names_by_head: dict[int, str], entry: KVTensor, read, geo: Geometry, settings) -> SharedResult:
    """The G0 per-head tensors of one stacked entry in one layer, converted together and handed out head by head."""
    def compute() -> dict[int, torch.Tensor]:
        stack = torch.stack([read(names_by_head[h]) for h in range(geo.kv_heads)])  # (G0, *shape)
        converted = _convert_heads(stack, entry, names_by_head[0], geo, settings)  # (G, *shape)
        return dict(enumerate(converted))

    return SharedResult(compute, range(settings.groups))


def plan_conversion(sources: Mapping[str, SourceTensor], read: Callable[[str], torch.Tensor],
                    spec: ArchitectureSpec, geo: Geometry | Mapping[str, Geometry],
                    settings: ConversionSettings) -> list[PlannedTensor]:
    """`geo`: one geometry for every attention kind, or kind -> geometry for the kinds to convert (tensors of the
    other kinds are copied unchanged: T5's encoder under the default scope)."""
    geos = dict(geo) if isinstance(geo, Mapping) else {kind: geo for kind in spec.attention}
    entries = [t for t in spec.tensors if t.attention in geos]
    matches = match_names(list(sources), entries)
    validate(sources, matches, entries, geos)
    by_layer = {}
    for layer_settings in settings.layers:
        by_layer.update(plan_layers(sources, read, geos[layer_settings.block.attention], settings, layer_settings))
    transposed = [key_pattern(t) for t in settings.native.transpose] if settings.native is not None else []
    stacked: dict[tuple[str, int, str], SharedResult] = {}
    planned = []
    for name, source in sources.items():
        dtype = settings.output_dtype(source.dtype)
        m = matches.get(name)
        if name in by_layer:
            shape, dtype, produce = by_layer[name]
            planned.append(PlannedTensor(name, dtype, shape, produce))
            continue
        if m is not None and settings.method is None:
            raise ConversionError(f"{name} holds K/V heads that the per-layer conversion does not reach; this "
                                  f"family's spec needs its block section to cover it")
        if m is None and any(p.match(name) for p in transposed):  # [in, out] -> the target's [out, in]
            planned.append(PlannedTensor(name, dtype, source.shape[::-1],
                                         lambda n=name, d=dtype: read(n).T.contiguous().to(d)))
            continue
        if m is None:
            unchanged = source.span if dtype == source.dtype else None
            planned.append(PlannedTensor(name, dtype, source.shape, lambda n=name, d=dtype: read(n).to(d), unchanged))
            continue
        geo = geos[m.entry.attention]
        if m.entry.layout == "stacked":
            if m.head >= settings.groups:
                continue
            key = (m.prefix, m.layer, m.entry.key)
            if key not in stacked:
                names = {mm.head: n for n, mm in matches.items()
                         if (mm.prefix, mm.layer, mm.entry.key) == key}
                if sorted(names) != list(range(geo.kv_heads)):
                    raise ConversionError(f"{name}: expected one {m.entry.key!r} per KV head "
                                          f"(0..{geo.kv_heads - 1}), found heads {sorted(names)}")
                stacked[key] = _stacked_heads(names, m.entry, read, geo, settings)
            planned.append(PlannedTensor(name, dtype, source.shape, stacked[key].producer(m.head, dtype)))
            continue
        rows = _expected_rows(m.entry, geo, settings.groups, output=True)
        if m.entry.transposed and settings.native is not None:  # written the target's way round: rows first
            shape = (rows, *source.shape[:-1])
        else:
            shape = resized(source.shape, rows, m.entry.transposed)
        make = _fused_producer if m.entry.layout == "fused" else _rows_producer
        planned.append(PlannedTensor(name, dtype, shape, make(name, m.entry, read, geo, settings, dtype)))
    return planned
