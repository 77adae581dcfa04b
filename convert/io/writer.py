"""Streaming safetensors writer: shard headers laid out from the plan, each tensor written where it belongs when it is
handed over.

Every output tensor's dtype and shape is known before any data is read, so each shard's header (with all offsets)
is written first, and a tensor handed over later is written straight into its place: the writer holds no tensor and
decides nothing about when work happens; the conversion loop hands tensors over in the model's order. Unchanged
tensors are copied byte for byte from the source. Shards get their final `model-0000k-of-0000N.safetensors` names
and an index with `total_size`; a checkpoint that fits one shard is written as `model.safetensors` with no index.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ConversionError
from gqa_toolkit.dtypes import SAFETENSORS_DTYPES
from .tensors import ByteSpan, OutputTensor

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# copy_file_range's refusals that mean "copy it yourself": another filesystem, or a filesystem without the call
NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
COPY_CHUNK = 16 << 20


def planned_bytes(tensors: Iterable[OutputTensor]) -> int:
    """What the tensors take on disk."""
    return sum(t.nbytes for t in tensors)


def split_into_shards(planned: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy, in plan order; a tensor larger than the cap gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in planned:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[OutputTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


def _copy_span(span: ByteSpan, out) -> None:
    """Copy a source byte range to the output's current position inside the kernel (no pass through user space),
    or through a buffer where the kernel cannot: across filesystems (EXDEV), or on filesystems without the call."""
    out.flush()
    with open(span.file, "rb") as src:
        offset, left = span.begin, span.end - span.begin
        while left:
            try:
                n = os.copy_file_range(src.fileno(), out.fileno(), left, offset)
            except OSError as exc:
                if exc.errno not in NO_KERNEL_COPY:
                    raise
                return _copy_buffered(src, out, offset, left, span)
            if n == 0:
                raise RuntimeError(f"{span.file} ended before byte {span.end}")
            offset, left = offset + n, left - n


def _copy_buffered(src, out, offset: int, left: int, span: ByteSpan) -> None:
    src.seek(offset)
    while left:
        chunk = src.read(min(left, COPY_CHUNK))
        if not chunk:
            raise RuntimeError(f"{span.file} ended before byte {span.end}")
        out.write(chunk)
        left -= len(chunk)


def check_finite(name: str, data: torch.Tensor) -> None:
    """Every tensor the converter computes must be finite: NaN or Inf in a source's K/V would otherwise be pooled
    into every head of the group, silently."""
    if data.is_floating_point() and not torch.isfinite(data).all():
        bad = int((~torch.isfinite(data)).sum())
        if data.dtype in (torch.float16, torch.bfloat16) and not torch.isnan(data).any():
            raise ConversionError(f"{name} would hold {bad} Inf values: past {str(data.dtype)[6:]}'s range (largest "
                                  f"{torch.finfo(data.dtype).max:.6g}); write a wider dtype (--dtype float32, or "
                                  f"drop --dtype to keep the source's)")
        raise ConversionError(f"{name} would hold {bad} NaN or Inf values (from the source's weights of that layer); "
                              f"the source checkpoint is damaged, re-download it or repair that tensor")


class CheckpointWriter:
    """Write the planned tensors into `out_dir` as they are handed over (`put`), in any order; `close` checks that
    every one was written, then writes the index. A context manager."""

    def __init__(self, out_dir: Path, planned: list[OutputTensor], max_shard_bytes: int,
                 on_bytes: Callable[[int], None] = lambda n: None):
        self.on_bytes = on_bytes
        shards = split_into_shards(planned, max_shard_bytes)
        names = [SINGLE_FILE] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.files = [open(out_dir / name, "wb") for name in names]
        self.places: dict[str, tuple] = {}  # name -> (file, offset, the planned tensor)
        for f, name, tensors in zip(self.files, names, shards):
            header = _header(tensors)
            f.write(header)
            offset = len(header)
            for t in tensors:
                self.places[t.name] = (f, offset, t)
                offset += t.nbytes
        self.index = None if len(shards) == 1 else {
            "metadata": {"total_size": planned_bytes(planned)},
            "weight_map": {t.name: name for name, tensors in zip(names, shards) for t in tensors}}
        self.out_dir, self.written, self.planned = out_dir, set(), planned

    def _seek(self, name: str):
        f, offset, planned = self.places[name]
        if name in self.written:
            raise RuntimeError(f"{name} was handed to the writer twice")
        f.seek(offset)
        return f, planned

    def copy_unchanged(self) -> None:
        """Copy every tensor planned unchanged from the source's bytes."""
        for t in self.planned:
            if t.copy_from is None:
                continue
            f, _ = self._seek(t.name)
            if hasattr(os, "copy_file_range"):
                _copy_span(t.copy_from, f)
            else:
                with open(t.copy_from.file, "rb") as src:
                    _copy_buffered(src, f, t.copy_from.begin, t.copy_from.end - t.copy_from.begin, t.copy_from)
            self.written.add(t.name)
            self.on_bytes(t.nbytes)

    def put(self, name: str, data: torch.Tensor) -> None:
        """Write one planned tensor; floating data is stored in the planned dtype (methods compute in float32)."""
        f, planned = self._seek(name)
        if data.is_floating_point() and planned.dtype.is_floating_point:
            data = data.to(planned.dtype)
        if data.dtype != planned.dtype or tuple(data.shape) != planned.shape:
            raise RuntimeError(f"{name}: handed {data.dtype} {list(data.shape)}, planned {planned.dtype} "
                               f"{list(planned.shape)}")
        check_finite(name, data)
        f.write(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.written.add(name)
        self.on_bytes(planned.nbytes)

    def close(self) -> None:
        for f in self.files:
            f.close()
        if missing := [name for name in self.places if name not in self.written]:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        if self.index is not None:
            (self.out_dir / INDEX_FILE).write_text(json.dumps(self.index, indent=2) + "\n")

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            for f in self.files:
                f.close()
