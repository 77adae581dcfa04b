"""`convert_checkpoint`: the whole conversion, from a source model directory to a new GQA checkpoint.

Everything that can be checked is checked before the first byte is written: config, family, G, method, weight
headers and every K/V shape. Then tensors stream from the source into an atomic output directory.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import ConversionError
from .families.config import ConfigReader, SourceConfig
from .families.geometry import check_groups, read_geometries
from .families.loading import load_transformers_config, own_model_types
from .families.rope import rope_layout
from .families.spec import ArchitectureSpec, spec_for
from .io.disk import check_free_space, disk_writes
from .io.model_dir import hub_cache_repo, read_raw_config, resolve_model_dir
from .io.output_dir import atomic_directory, check_output_free
from .io.reader import CheckpointReader
from .io.tensors import ByteSpan, SourceTensor
from .io.writer import planned_bytes, write_checkpoint
from .methods.block_stream import BlockStream, StreamedMoments
from .methods.calibration import BUILTIN, calibration_tokens
from .methods.grouping import GROUPINGS
from .methods.registry import LAYER_METHODS, get_method
from .plan.checkpoint import plan_conversion
from .plan.layers import check_block_support
from .plan.settings import ConversionSettings, ConvertedLayers, LayerSettings
from .provenance import conversion_record, write_metadata, write_modeling

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from an int, or from a size with its unit: "5000000B", "5MB", "2GiB", "1.5GB"."""
    if isinstance(text, int) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if m and not m[2]:
        raise ConversionError(f"--max-shard-size {text!r} has no unit; write it with one, e.g. {m[1]}MB, {m[1]}GB "
                              f"or {m[1]}B for bytes")
    if not m or m[2].upper() not in SIZE_UNITS or float(m[1]) * SIZE_UNITS[m[2].upper()] < 1:
        raise ConversionError(f"cannot read --max-shard-size {text!r}; write a positive size with a unit, like "
                              f"500MB, 5GB or 2GiB")
    return int(float(m[1]) * SIZE_UNITS[m[2].upper()])


def check_calibration_shape(samples: int, length: int) -> None:
    if samples < 1:
        raise ConversionError(f"--calibration-samples {samples} must be at least 1 (default 256)")
    if length < 2:
        raise ConversionError(f"--calibration-length {length} must be at least 2 tokens (default 128)")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def default_output(model_dir: Path, groups: int, method: str, grouping: str = "contiguous",
                   preserve_norm: bool = False) -> Path:
    """Beside the source, or, for a snapshot in the hub cache, in the current directory named after the repository
    (never inside the cache)."""
    options = ("-similarity" if grouping == "similarity" else "") + ("-norm" if preserve_norm else "")
    repo = hub_cache_repo(model_dir)
    if repo is not None:
        return Path.cwd() / f"{repo.name.split('--')[-1]}-gqa{groups}-{method}{options}"
    return model_dir.parent / f"{model_dir.name}-gqa{groups}-{method}{options}"


def parse_device(name: str | torch.device) -> torch.device:
    """`auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConversionError(f"unknown --device {name!r}; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConversionError(f"--device {name} but this machine has no CUDA GPU; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConversionError(f"--device {name} but this machine has {torch.cuda.device_count()} GPU(s); choose "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ConversionError(f"unknown --device {name!r}; choose auto, cpu, cuda or cuda:N")
    return device


def _layer_settings(model_dir: Path, config: ConfigReader, raw_config: dict, spec, names: list[str], geometries, *,
                    method: str, grouping: str, preserve_norm: bool, calibration, samples: int, length: int,
                    device: torch.device, progress: bool, calibration_mode: str, calibrate: bool = True):
    """What the per-layer path needs, with the calibration moments collected; None when the per-tensor path
    does the job (mean, first, random with contiguous groups)."""
    if grouping not in GROUPINGS:
        raise ConversionError(f"unknown grouping {grouping!r}; choose one of: {', '.join(GROUPINGS)}")
    layer_method = LAYER_METHODS.get(method)
    if preserve_norm and layer_method is not None and not layer_method.pools:
        raise ConversionError(f"--preserve-norm applies to pooling methods (mean, first, random, aligned); "
                              f"{method!r} fits each head's scale itself, drop the option")
    if layer_method is None and grouping == "contiguous":
        return None, {}
    what = f"--method {method}" if layer_method is not None else f"--grouping {grouping}"
    check_block_support(spec, raw_config["model_type"], names, what)
    if spec.block.attention not in geometries:
        raise ConversionError(f"{what} converts the {spec.block.attention!r} attention, which --attention leaves out")
    geo = geometries[spec.block.attention]
    if calibration is None:
        calibration = BUILTIN if layer_method is not None and layer_method.calibrated else "none"
    if calibration_mode not in CALIBRATION_MODES:
        raise ConversionError(f"unknown --calibration-mode {calibration_mode!r}; choose one of: "
                              f"{', '.join(CALIBRATION_MODES)}")
    moments, converted = None, None
    calibrated = not (isinstance(calibration, str) and calibration == "none")
    if calibrated:
        check_calibration_shape(samples, length)
    if calibrated and calibrate:  # a dry run checks the calibration and does not run it
        tokens = calibration if isinstance(calibration, torch.Tensor) else calibration_tokens(
            model_dir, calibration, samples, length)
        bar = (lambda n: tqdm(total=n, unit="block", desc=f"calibration on {device}")) if progress else None
        if calibration_mode == "sequential" and spec.block.qkv:
            raise ConversionError(f"--calibration-mode sequential supports separate q, k and v projections; "
                                  f"{raw_config['model_type']} fuses them, use --calibration-mode source")
        converted = ConvertedLayers() if calibration_mode == "sequential" else None
        moments = StreamedMoments(BlockStream(model_dir, spec.block, tokens, device=device, progress=bar,
                                              converted=converted.take if converted else None,
                                              kv_head_dim=geo.head_dim))
    described = "token ids" if isinstance(calibration, torch.Tensor) else calibration
    record = {"grouping": grouping, "calibration": described,
              "calibration_sequences": 0 if moments is None else int(len(tokens)),
              "calibration_tokens": 0 if moments is None else int(tokens.numel())}
    if moments is not None:
        record["calibration_mode"] = calibration_mode
    return LayerSettings(method, grouping, preserve_norm, rope_layout(spec.block.rope, config, geo.head_dim),
                         moments, converted, spec.block.fused_layout, spec.block.transposed), record


# source: every layer calibrated on the source's activations; sequential: each layer on the outputs of the
# converted layers before it, so later layers make up for earlier ones' errors
CALIBRATION_MODES = ("source", "sequential")


@dataclass(frozen=True)
class Prepared:
    """Everything a conversion will do, known before any output is written."""

    model_dir: Path
    out: Path
    raw_config: dict
    spec: ArchitectureSpec
    planned: list
    shard_bytes: int
    record: dict
    sources: dict
    calibration: dict | None  # samples, length, device, mode of the calibration forward; None without one


def _prepare(src, dst, *, method: str, groups: int, seed: int, dtype, max_shard_size, attention, force: bool,
             progress: bool, grouping: str, preserve_norm: bool, calibration, calibration_samples: int,
             calibration_length: int, device, calibration_mode: str, calibrate: bool = True) -> Prepared:
    model_dir = resolve_model_dir(src)
    raw_config = read_raw_config(model_dir)
    spec = spec_for(raw_config["model_type"])
    if spec.modeling is not None:
        from .families import modeling  # noqa: F401  registers the GQA classes (4 s of imports only families like gpt2 need)
    method_fn = get_method(method)
    target_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    scope = attention or spec.default_scope
    config = SourceConfig(raw_config, spec.config, load=lambda: load_transformers_config(model_dir))
    geometries = read_geometries(config, spec, scope)
    for geometry in geometries.values():
        check_groups(groups, geometry, spec)
    out = Path(dst).expanduser().resolve() if dst is not None else default_output(
        model_dir, groups, method, grouping, preserve_norm)
    check_output_free(out, force, model_dir)

    reader = CheckpointReader(model_dir)
    sources = {name: SourceTensor(info.dtype, info.shape, ByteSpan(info.file, *info.offsets) if info.offsets else None)
               for name, info in reader.infos.items()}
    device = parse_device(device)
    layer, options = _layer_settings(model_dir, config, raw_config, spec, list(sources), geometries, method=method,
                                     grouping=grouping, preserve_norm=preserve_norm, calibration=calibration,
                                     samples=calibration_samples, length=calibration_length,
                                     device=device, progress=progress,
                                     calibration_mode=calibration_mode, calibrate=calibrate)
    if preserve_norm:
        options["preserve_norm"] = True
    settings = ConversionSettings(method=method_fn, groups=groups, seed=seed, dtype=target_dtype,
                                  preserve_norm=preserve_norm, layer=layer)
    planned = plan_conversion(sources, reader.read, spec, geometries, settings)
    shard_bytes = shard_bytes or max(p.stat().st_size for p in reader.files)
    record = conversion_record(method=method, groups=groups, source=str(model_dir), geometries=geometries,
                               scope=scope, seed=seed, dtype=target_dtype, options=options)
    calibrated = "calibration" in options and options["calibration"] != "none"
    calibration_run = dict(samples=calibration_samples, length=calibration_length, device=device,
                           mode=calibration_mode) if calibrated else None
    return Prepared(model_dir, out, raw_config, spec, planned, shard_bytes, record, sources, calibration_run)


def convert_checkpoint(src: str | Path, dst: str | Path | None = None, *, method: str = "mean", groups: int,
                       seed: int = 0, dtype: str | torch.dtype | None = None, max_shard_size: str | int | None = None,
                       attention: str | None = None, force: bool = False, progress: bool = True,
                       grouping: str = "contiguous", preserve_norm: bool = False,
                       calibration: str | torch.Tensor | None = None, calibration_samples: int = 256,
                       calibration_length: int = 128, device: str | torch.device = "auto",
                       calibration_mode: str = "source") -> Path:
    """Convert the checkpoint at `src` (a model directory or hub id) to `groups` KV heads; returns the output dir.

    `attention` picks which attention the family converts (T5: "decoder", the default and the paper's choice, or
    "all" to include the encoder); None is the family's default.
    `grouping`: "contiguous" (repeat_kv order) or "similarity" (heads grouped by similarity, with query rows and
    output columns permuted to match). `preserve_norm`: scale pooled heads to their group's mean norm.
    `calibration`: text for the activations that `fit` (by default) and similarity/alignment (when given) weigh
    errors by: "python-stdlib", a text file or folder, token ids `(N, T)`, or "none" (weights only);
    `calibration_samples` sequences of `calibration_length` tokens, run on `device` block by block, in
    `calibration_mode` "source" or "sequential". `describe_conversion` takes the same arguments and writes
    nothing."""
    p = _prepare(src, dst, method=method, groups=groups, seed=seed, dtype=dtype, max_shard_size=max_shard_size,
                 attention=attention, force=force, progress=progress, grouping=grouping, preserve_norm=preserve_norm,
                 calibration=calibration, calibration_samples=calibration_samples,
                 calibration_length=calibration_length, device=device, calibration_mode=calibration_mode)
    total = planned_bytes(p.planned)
    check_free_space(p.out, total, "--output", ConversionError)
    with disk_writes(f"the output {p.out}", "--output", ConversionError, path=p.out.parent), \
            atomic_directory(p.out, force, p.model_dir) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                 desc=f"gqa-convert {method} G={groups}") as bar:
        write_checkpoint(tmp, p.planned, p.shard_bytes, on_bytes=bar.update)
        write_metadata(p.model_dir, tmp, p.raw_config, p.spec, p.record)
    return p.out


def describe_conversion(src: str | Path, dst: str | Path | None = None, **options) -> list[str]:
    """What `convert_checkpoint(src, dst, **options)` would do, as lines, with nothing written and no calibration
    run; a ConversionError when the disk or the calibration device has too little room, with the numbers."""
    from .plan.dry_run import describe

    defaults = {name: p.default for name, p in inspect.signature(convert_checkpoint).parameters.items()
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    return describe(_prepare(src, dst, **{**defaults, **options, "progress": False}, calibrate=False))


def refresh_modeling(model_dir: str | Path) -> list[Path]:
    """Rewrite the toolkit's modeling files in an earlier output (a converted t5, gpt_neox, gpt2 or opt directory)
    with this version's, each file replaced atomically; weights and config are left as they are."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ConversionError(f"no such directory: {path}; pass a directory written by gqa-convert")
    model_type = read_raw_config(path)["model_type"]
    spec = spec_for(model_type)
    if spec.modeling is None or model_type != spec.modeling.model_type:
        raise ConversionError(f"{path} has model_type {model_type!r}, which runs on stock transformers code; only "
                              f"directories of the toolkit's own families ({', '.join(sorted(own_model_types()))}) "
                              "carry modeling files to refresh")
    return write_modeling(path, spec)
