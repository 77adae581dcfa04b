"""What the planner tells the writer: each output tensor's name, dtype and shape, and where an unchanged one's bytes
already lie."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    copy_from: ByteSpan | None = None  # an unchanged tensor: the writer copies these bytes without reading them

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize
