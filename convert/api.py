"""`convert_checkpoint`: the whole conversion, from a source model directory to a new GQA checkpoint.

Everything that can be checked is checked before the first byte is written: config, family, G, method, weight
headers and every K/V shape. Then tensors stream from the source into an atomic output directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .architectures.spec import spec_for
from .errors import ConversionError
from .geometry import check_groups, read_geometries
from .methods import get_method
from .output_dir import atomic_directory, check_output_free
from .plan import ConversionSettings, SourceTensor, plan_conversion
from .provenance import conversion_record, write_metadata
from .reader import CheckpointReader
from .source import read_raw_config, resolve_model_dir
from .writer import write_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from 5000000, "5MB", "2GiB" or "1.5GB"."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in SIZE_UNITS:
        raise ConversionError(f"cannot read shard size {text!r}; write bytes or a size like 500MB, 5GB, 2GiB")
    return int(float(m[1]) * SIZE_UNITS[m[2].upper()])


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def default_output(model_dir: Path, groups: int, method: str) -> Path:
    return model_dir.parent / f"{model_dir.name}-gqa{groups}-{method}"


def _load_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, TypeError) as exc:
        raise ConversionError(f"transformers cannot read {model_dir / 'config.json'}: {exc}") from None


def convert_checkpoint(src: str | Path, dst: str | Path | None = None, *, method: str = "mean", groups: int,
                       seed: int = 0, dtype: str | torch.dtype | None = None, max_shard_size: str | int | None = None,
                       attention: str | None = None, force: bool = False, progress: bool = True) -> Path:
    """Convert the checkpoint at `src` (a model directory or hub id) to `groups` KV heads; returns the output dir.

    `attention` picks which attention the family converts (T5: "decoder", the default and the paper's choice, or
    "all" to include the encoder); None is the family's default."""
    model_dir = resolve_model_dir(src)
    raw_config = read_raw_config(model_dir)
    spec = spec_for(raw_config["model_type"])
    method_fn = get_method(method)
    target_dtype = parse_dtype(dtype)
    scope = attention or spec.default_scope
    geometries = read_geometries(_load_config(model_dir), spec, scope)
    for geometry in geometries.values():
        check_groups(groups, geometry, spec)
    out = Path(dst).expanduser().resolve() if dst is not None else default_output(model_dir, groups, method)
    check_output_free(out, force)

    reader = CheckpointReader(model_dir)
    sources = {name: SourceTensor(info.dtype, info.shape) for name, info in reader.infos.items()}
    settings = ConversionSettings(method=method_fn, groups=groups, seed=seed, dtype=target_dtype)
    planned = plan_conversion(sources, reader.read, spec, geometries, settings)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else max(
        p.stat().st_size for p in reader.files)
    record = conversion_record(method=method, groups=groups, source=str(model_dir), geometries=geometries,
                               scope=scope, seed=seed, dtype=target_dtype)

    total = sum(t.dtype.itemsize * torch.Size(t.shape).numel() for t in planned)
    with atomic_directory(out, force) as tmp, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                                   desc=f"gqa-convert {method} G={groups}") as bar:
        write_checkpoint(tmp, planned, shard_bytes, on_bytes=bar.update)
        write_metadata(model_dir, tmp, raw_config, spec, record)
    return out
