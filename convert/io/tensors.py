"""What the planner hands the writer: each output tensor's name, dtype, shape and how to produce its bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class ByteSpan:
    file: Path
    begin: int
    end: int


@dataclass(frozen=True)
class SourceTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    span: ByteSpan | None = None  # where its bytes lie on disk, when they can be copied as they are


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    copy_from: ByteSpan | None = None  # an unchanged tensor: the writer copies these bytes without reading them
