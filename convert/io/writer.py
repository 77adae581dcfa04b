"""Streaming safetensors writer: shard headers laid out from the plan, tensor data written as it is produced.

Since every output tensor's dtype and shape is planned before any data is read, each shard's header (with all
offsets) is written first and tensors are then streamed into place one at a time: memory holds one tensor, not a
shard. Shards get their final `model-0000k-of-0000N.safetensors` names and an index with `total_size`; a checkpoint
that fits one shard is written as `model.safetensors` with no index.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConversionError
from .dtypes import SAFETENSORS_DTYPES
from .tensors import ByteSpan, PlannedTensor

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# copy_file_range's refusals that mean "copy it yourself": another filesystem, or a filesystem without the call
NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
COPY_CHUNK = 16 << 20


def _nbytes(t: PlannedTensor) -> int:
    numel = 1
    for size in t.shape:
        numel *= size
    return numel * t.dtype.itemsize


def planned_bytes(tensors: list[PlannedTensor]) -> int:
    """What the tensors take on disk."""
    return sum(_nbytes(t) for t in tensors)


def split_into_shards(planned: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, in plan order; a tensor larger than the cap gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in planned:
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t)
    return shards


def _header(tensors: list[PlannedTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
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


def _write_shard(path: Path, tensors: list[PlannedTensor], on_bytes: Callable[[int], None]) -> None:
    with open(path, "wb") as f:
        f.write(_header(tensors))
        for t in tensors:
            if t.copy_from is not None and hasattr(os, "copy_file_range"):
                _copy_span(t.copy_from, f)
                on_bytes(_nbytes(t))
                continue
            data = t.produce()
            if data.dtype != t.dtype or tuple(data.shape) != t.shape:
                raise RuntimeError(f"{t.name}: produced {data.dtype} {list(data.shape)}, planned {t.dtype} "
                                   f"{list(t.shape)}")
            check_finite(t.name, data)
            f.write(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            on_bytes(_nbytes(t))


def write_checkpoint(out_dir: Path, planned: list[PlannedTensor], max_shard_bytes: int,
                     on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Write the planned tensors into out_dir: one model.safetensors, or shards and their index."""
    shards = split_into_shards(planned, max_shard_bytes)
    if len(shards) == 1:
        _write_shard(out_dir / SINGLE_FILE, shards[0], on_bytes)
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, tensors in zip(names, shards):
        _write_shard(out_dir / name, tensors, on_bytes)
        weight_map.update({t.name: name for t in tensors})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in planned)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
