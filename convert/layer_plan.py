"""Per-layer planning, for conversions that change Q and O with K and V (layer methods, similarity grouping).

Each layer's q, k, v, o tensors are produced together: the first one the writer asks for reads the layer's four
projections, runs `convert_layer` and keeps the results until the last is handed out, so memory stays at about
one layer. Output shapes are known up front (q and o keep theirs, k and v get G heads), as the writer needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .architectures.spec import ArchitectureSpec, key_pattern
from .errors import ConversionError
from .geometry import Geometry
from .layer_api import AttentionWeights, convert_layer
from .layer_block import InputMoments
from .rope import RopeLayout

ROLES = ("q", "k", "v", "o")


class ConvertedLayers:
    """Each converted layer's projections by on-disk name, for sequential calibration: held from conversion until
    the calibration stream has run the converted block (`take`), which converts a layer itself if the writer has
    not reached it yet."""

    def __init__(self):
        self.groups: dict[int, "_LayerGroup"] = {}
        self.ready: dict[int, dict[str, torch.Tensor]] = {}

    def take(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self.ready:
            self.groups[layer].convert()
        return self.ready.pop(layer)


@dataclass(frozen=True)
class LayerSettings:
    method: str
    grouping: str
    preserve_norm: bool
    rope: RopeLayout
    calibration: Mapping[int, InputMoments] | None = None
    converted: ConvertedLayers | None = None  # sequential calibration: tell it of every converted layer


def _find(templates, names, suffix: str) -> dict[tuple[str, int], str]:
    """(prefix, layer) -> on-disk name, for the first template any name matches."""
    for template in templates:
        pattern = key_pattern(template + suffix)
        found = {(m["prefix"], int(m["layer"])): n for n in names if (m := pattern.match(n))}
        if found:
            return found
    return {}


def check_block_support(spec: ArchitectureSpec, model_type: str, names: list[str], what: str) -> None:
    block = spec.block
    supported = sorted({t for s in _all_specs() if s.block for t in s.block.model_types})
    for template in block.refuse_if_present if block is not None else ():
        if found := _find([template], names, ""):
            raise ConversionError(f"{what} cannot convert {next(iter(found.values()))}: per-head query/key norms "
                                  f"do not commute with head rotations or permutations; use --method mean, first "
                                  f"or random with --grouping contiguous")
    if block is None or model_type not in block.model_types:
        raise ConversionError(f"{what} changes Q and O with K and V and supports model types "
                              f"{', '.join(supported)}; {model_type!r} is not one (fused q/k/v layouts and "
                              f"families without a tested layer spec are refused); use --method mean, first or "
                              f"random with --grouping contiguous")


def _all_specs():
    from .architectures.spec import all_specs

    return all_specs().values()


class _LayerGroup:
    def __init__(self, names: dict[str, str | None], layer: int, read, geo: Geometry, settings, layer_settings):
        self.names, self.layer, self.read, self.geo = names, layer, read, geo
        self.settings, self.layer_settings = settings, layer_settings
        self.outputs: dict[str, torch.Tensor] | None = None
        self.pending = {n for n in names.values() if n is not None}

    def _convert(self) -> dict[str, torch.Tensor]:
        read = {role: self.read(n) if n is not None else None for role, n in self.names.items()}
        weights = AttentionWeights(read["q"], read["k"], read["v"], read["o"], read["q_bias"], read["k_bias"],
                                   read["v_bias"])
        ls = self.layer_settings
        moments = ls.calibration[self.layer] if ls.calibration is not None else None
        out = convert_layer(weights, heads=self.geo.heads, kv_heads=self.geo.kv_heads, groups=self.settings.groups,
                            method=ls.method, rope=ls.rope, grouping=ls.grouping, preserve_norm=ls.preserve_norm,
                            calibration=moments, seed=self.settings.seed, init_std=self.geo.init_std,
                            names={f"{r[0]}.{'bias' if r.endswith('bias') else 'weight'}": n
                                   for r, n in self.names.items() if n is not None})
        return {n: getattr(out, role) for role, n in self.names.items() if n is not None}

    def convert(self) -> None:
        if self.outputs is None and self.pending:
            self.outputs = self._convert()
            if self.layer_settings.converted is not None:
                self.layer_settings.converted.ready[self.layer] = self.outputs

    def producer(self, name: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            self.convert()
            out = self.outputs[name].to(dtype).contiguous()
            self.pending.discard(name)
            if not self.pending:
                self.outputs = None
            return out

        return produce


def plan_layers(sources: Mapping, read, spec: ArchitectureSpec, geo: Geometry, settings,
                layer_settings: LayerSettings, out_dtype) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """On-disk name -> (output shape, producer) for every q, k, v, o weight and q, k, v bias of every layer."""
    names = list(sources)
    found = {role: _find(getattr(spec.block, role), names, ".weight") for role in ROLES}
    found.update({f"{role}_bias": _find(getattr(spec.block, role), names, ".bias") for role in "qkv"})
    layers = sorted(found["k"])
    if [layer for _, layer in layers] != list(range(geo.num_layers)):
        raise ConversionError(f"found k projections for layers {[l for _, l in layers][:8]} but config.json has "
                              f"{geo.num_layers} layers; the weight files do not match config.json")
    planned = {}
    for key in layers:
        group_names = {role: found[role].get(key) for role in found}
        missing = [r for r in ROLES if group_names[r] is None]
        if missing:
            raise ConversionError(f"layer {key[1]} has no {' or '.join(missing)} projection among "
                                  f"{[getattr(spec.block, r) for r in missing]}")
        group = _LayerGroup(group_names, key[1], read, geo, settings, layer_settings)
        if layer_settings.converted is not None:
            layer_settings.converted.groups[key[1]] = group
        rows = settings.groups * geo.head_dim
        for role, name in group_names.items():
            if name is None:
                continue
            shape = tuple(sources[name].shape)
            if role[0] in "kv":
                shape = (rows, *shape[1:])
            dtype = out_dtype(sources[name].dtype, settings)
            planned[name] = (shape, dtype, group.producer(name, dtype))
    return planned
