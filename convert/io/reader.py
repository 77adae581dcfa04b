"""Lazy checkpoint reading: tensor names, dtypes and shapes from file headers, tensor data one tensor at a time.

Safetensors files are read with positioned reads from the header's offsets instead of a memory map, so reading
a whole checkpoint never keeps more than the current tensor resident. PyTorch `.bin` files go through
`torch.load(weights_only=True, mmap=True)`, one file open at a time.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError
from gqa_toolkit.dtypes import SAFETENSORS_DTYPES
from gqa_toolkit.model_dir import hub_cache_repo

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None = None  # absolute byte range in a safetensors file

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header; a truncated or corrupt file is a ConversionError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is truncated or not a safetensors file (only {size} bytes); re-download it")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ConversionError(f"{path} is truncated or corrupt (header length {header_len} past the file's "
                                  f"{size} bytes); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{path} has a corrupt safetensors header ({exc}); re-download it") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, not an "
                              f"object); re-download it")
    data_start = 8 + header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if not all(_count(n) for n in (*shape, begin, end)) or begin > end:
                raise ValueError
            info = TensorInfo(name, path, dtype, shape, (data_start + begin, data_start + end))
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path} has a corrupt or unsupported header entry for {name!r} "
                                  f"({json.dumps(entry)[:120]}); re-download it") from None
        if info.offsets[1] > size or info.offsets[1] - info.offsets[0] != info.nbytes:
            raise ConversionError(f"{path} is truncated or corrupt: tensor {name!r} ends past the file or has a "
                                  f"size that disagrees with its shape; re-download it")
        infos.append(info)
    return infos


_FP8 = tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                             "float8_e5m2fnuz", "float8_e8m0fnu")) if d is not None)


def quantized_tensor(info: TensorInfo) -> bool:
    """A tensor the methods cannot pool: fp8, a packed or int8 weight matrix, or an integer `weight` (the
    position ids and masks some checkpoints carry stay allowed)."""
    if info.dtype in _FP8:
        return True
    integer = not (info.dtype.is_floating_point or info.dtype.is_complex or info.dtype == torch.bool)
    return integer and (info.name.endswith("weight") or (info.dtype in (torch.int8, torch.uint8) and
                                                         len(info.shape) >= 2))


def check_not_quantized(infos) -> None:
    """Conversion averages weights in floating point: a quantized checkpoint is refused with the fix."""
    for info in infos:
        if quantized_tensor(info):
            raise ConversionError(f"{info.file.name} holds {info.name} as {str(info.dtype).removeprefix('torch.')}"
                                  f" (a quantized checkpoint); dequantize it first (load it and save_pretrained "
                                  f"in float16, bfloat16 or float32), then convert that")


def _count(value) -> bool:
    """A dimension or byte offset: a non-negative int (JSON true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ConversionError(f"{path} needs unsafe unpickling to load ({first_line}); convert it to safetensors "
                              f"from a trusted environment, or use the source's .safetensors files") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({exc}); re-download it") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, in shard order; safetensors preferred over .bin when both exist."""
    for index_name in WEIGHT_INDEXES:
        index = model_dir / index_name
        if index.is_file():
            files = sorted(set(_weight_map(index).values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise ConversionError(f"{index} names shard files that are missing: {', '.join(missing)}; "
                                      f"download the complete checkpoint")
            return [check_inside_source(model_dir / f, model_dir) for f in files]
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in model_dir.glob(pattern) if p.is_file() and p.name != "training_args.bin")
        if files:
            return [check_inside_source(f, model_dir) for f in files]
    raise ConversionError(f"no weight files (*.safetensors or *.bin) in {model_dir}; point at a complete "
                          f"Hugging Face model directory")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{index} is not valid JSON ({exc}); re-download it") from None
    except (KeyError, TypeError):
        raise ConversionError(f"{index} has no weight_map; re-download it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..")
                                                   for f in weight_map.values()):
        raise ConversionError(f"{index}'s weight_map must map tensor names to shard file names in the same "
                              f"directory; re-download it")
    return weight_map


def source_root(model_dir: Path) -> Path:
    """The folder a source's files may live in: the directory itself, or for a hub cache snapshot
    (`models--org--name/snapshots/<revision>`) the repository's cache folder, whose `blobs/` its links point into."""
    return (hub_cache_repo(model_dir) or model_dir).resolve()


def stays_inside_source(path: Path, model_dir: Path) -> bool:
    root = source_root(model_dir)
    return path.resolve().is_relative_to(root)


def _hub_blob(path: Path) -> bool:
    """A file in a hub cache's blob store (`models--org--name/blobs/`), where `--local-dir` downloads of older
    huggingface_hub releases and other caches link weights to."""
    target = path.resolve()
    return target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")


def check_inside_source(path: Path, model_dir: Path) -> Path:
    """Weights are read only from the source directory, or from a hub cache's blob store it links into."""
    if not stays_inside_source(path, model_dir) and not _hub_blob(path):
        raise ConversionError(f"{path} is a link to {path.resolve()}, outside the source directory; copy the file "
                              f"into {model_dir} if it belongs to this checkpoint")
    return path


class CheckpointReader:
    """Names, dtypes and shapes of every tensor up front; data read lazily, one tensor (or .bin file) at a time."""

    def __init__(self, model_dir: Path):
        self.files = weight_files(model_dir)
        self.infos: dict[str, TensorInfo] = {}
        self._bin_path: Path | None = None
        self._bin_state: dict[str, torch.Tensor] = {}
        for path in self.files:
            for info in self._file_infos(path):
                self.infos[info.name] = info
        check_not_quantized(self.infos.values())

    def _file_infos(self, path: Path) -> list[TensorInfo]:
        if path.suffix == ".safetensors":
            try:
                return read_safetensors_header(path)
            except OSError as exc:
                raise ConversionError(f"cannot read {path} ({exc.strerror or exc}); check its permissions, or "
                                      f"re-download it") from None
        state = self._open_bin(path)
        return [TensorInfo(n, path, t.dtype, tuple(t.shape)) for n, t in state.items()]

    def _open_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if self._bin_path != path:
            self._bin_state = {}  # release the previous file's map before opening the next
            self._bin_state = _load_bin(path)
            self._bin_path = path
        return self._bin_state

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        if info.offsets is None:
            return self._open_bin(info.file)[name].clone()
        begin, end = info.offsets
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        # torch.empty, not bytearray: a bytearray is zero-filled first, a second pass over memory the read overwrites
        data = torch.empty(end - begin, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as f:
            view, done = memoryview(data.numpy()), 0
            while done < len(view):
                n = os.preadv(f.fileno(), [view[done:]], begin + done)
                if n == 0:
                    raise ConversionError(f"{info.file} ended early while reading {name!r}; re-download it")
                done += n
        return data.view(info.dtype).reshape(info.shape)
