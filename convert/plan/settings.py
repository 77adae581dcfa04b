"""What the planner is asked to do: the per-tensor settings, and the per-layer ones for the layer methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..methods.registry import Method
from .shared import SharedResult

if TYPE_CHECKING:
    from ..families.spec import AttentionBlock, NativeTarget
    from ..families.rope import RopeLayout
    from ..methods.layer_types import InputMoments


class ConvertedLayers:
    """Each converted layer's projections by on-disk name, shaped as the source's (K/V repeated to its heads), for
    sequential calibration: held from conversion until the calibration stream has run the converted block (`take`),
    which converts a layer itself if the writer has not reached it yet."""

    def __init__(self):
        self.groups: dict[int, SharedResult] = {}
        self.ready: dict[int, dict[str, torch.Tensor]] = {}

    def hold(self, layer: int, shape: Callable[[dict], dict], by_name: dict[str, torch.Tensor]) -> None:
        """Keep a layer's converted tensors (by on-disk name) as `shape` makes them, until `take`."""
        self.ready[layer] = shape(by_name)

    def take(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self.ready:
            self.groups[layer].ensure()
        return self.ready.pop(layer)


@dataclass(frozen=True)
class LayerSettings:
    """How the layers of one attention block (one attention kind) are converted."""

    block: AttentionBlock
    method: str
    grouping: str
    preserve_norm: bool
    rope: RopeLayout
    calibration: Mapping[int, InputMoments] | None = None  # by layer: the moments of Q's input
    key_calibration: Mapping[int, InputMoments] | None = None  # cross-attention: of K's and V's (encoder states)
    converted: ConvertedLayers | None = None  # sequential calibration: tell it of every converted layer

    @property
    def fused(self) -> str | None:
        """The block's fused q/k/v layout, when it has one."""
        return self.block.fused_layout

    @property
    def transposed(self) -> bool:
        """The block's weights are `[in, out]` (Conv1D)."""
        return self.block.transposed


@dataclass(frozen=True)
class ConversionSettings:
    method: Method | None  # the per-head method; None when `layer` converts every K/V tensor
    groups: int
    seed: int = 0
    dtype: torch.dtype | None = None  # None keeps each tensor's dtype
    preserve_norm: bool = False  # scale each pooled head to its group's mean head norm
    # set: q, k, v, o of these blocks are produced per layer (layer methods, similarity grouping)
    layers: tuple[LayerSettings, ...] = ()
    native: NativeTarget | None = None  # set: the output is this stock family (its weight layout)

    def output_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """A source tensor's dtype in the output: floating tensors take `dtype` when one is set."""
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype
