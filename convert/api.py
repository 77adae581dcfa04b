"""`convert_checkpoint`: the whole conversion, from a source model directory to a new GQA checkpoint.

Everything that can be checked is checked before the first byte is written: config, family, G, method, weight
headers and every K/V shape. Then tensors stream from the source into an atomic output directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import ConversionError
from gqa_toolkit.families.config import ConfigReader, SourceConfig
from gqa_toolkit.families.geometry import check_groups, read_geometries
from gqa_toolkit.families.loading import load_transformers_config, own_model_types
from gqa_toolkit.families.rope import rope_layout
from gqa_toolkit.families.spec import ArchitectureSpec, lm_auto_class_name, spec_for
from gqa_toolkit.disk import check_free_space, disk_writes
from gqa_toolkit.model_dir import hub_source, read_raw_config, resolve_model_dir
from gqa_toolkit.output_dir import atomic_directory, check_output_free
from .io.reader import CheckpointReader
from .io.tensors import ByteSpan, SourceTensor
from .io.writer import CheckpointWriter, planned_bytes
from .methods.block_stream import BlockStream
from .methods.audio_calibration import audio_calibration, check_calibration_language, has_transcripts, holds_audio
from .methods.calibration import BUILTIN, calibration_tokens
from .methods.refinement import RefineSettings
from .methods.unit import UnitConversion
from .options import ConversionOptions
from .plan.planner import Plan, check_layer_support, plan_conversion
from .run import run_conversion
from .provenance import conversion_record, write_metadata, write_modeling


def default_output(model_dir: Path, options: ConversionOptions, default_scope: str) -> Path:
    """Beside the source, or, for a snapshot in the hub cache, in the current directory named after the repository
    (never inside the cache)."""
    if hub := hub_source(model_dir):
        return Path.cwd() / f"{hub['repo'].split('/')[-1]}{options.output_suffix(default_scope)}"
    return model_dir.parent / f"{model_dir.name}{options.output_suffix(default_scope)}"


def _calibration_stream(model_dir: Path, config: ConfigReader, raw_config: dict, spec, names: list[str], geometries,
                        options: ConversionOptions, progress: bool, calibrate: bool = True):
    """The source's block stream that calibrates the layer methods (None without calibration, and in a dry run,
    which checks the calibration and does not run it), and what the conversion record says of it."""
    if not options.per_layer:
        return None, {}
    what = f"--method {options.method}" if options.layer_method is not None else f"--grouping {options.grouping}"
    check_layer_support(spec, raw_config["model_type"], names, what, options.grouping)
    calibration = options.calibration
    if options.calibrated:
        _check_calibration(spec, raw_config["model_type"], options, config)
        if spec.audio is not None:
            check_calibration_language(model_dir, options.calibration_language)
    stream, sequences, tokens, audio = None, 0, 0, options.calibrated and spec.audio is not None
    audio_inputs = None
    if options.calibrated and calibrate:
        if audio:
            audio_inputs = audio_calibration(
                model_dir, calibration, options.calibration_samples, lm_auto_class_name(raw_config["model_type"], True),
                device=options.device, language=options.calibration_language)
            inputs, sequences, tokens = audio_inputs.batches, audio_inputs.clips, audio_inputs.tokens
        else:
            inputs = calibration if isinstance(calibration, torch.Tensor) else calibration_tokens(
                model_dir, calibration, options.calibration_samples, options.calibration_length)
            sequences, tokens = len(inputs), inputs.numel()
        bar = (lambda n: tqdm(total=n, unit="block", desc=f"calibration on {options.device}")) if progress else None
        stream = BlockStream(model_dir, spec.blocks, inputs, kinds=list(geometries), device=options.device,
                             progress=bar, sequential=options.calibration_mode == "sequential",
                             record_calls=options.refine_steps > 0,
                             batch_size=options.refine_batch if options.refine_steps else 8)
    record = {"grouping": options.grouping,
              "calibration": "token ids" if isinstance(calibration, torch.Tensor) else str(calibration),
              "calibration_sequences": int(sequences), "calibration_tokens": int(tokens)}
    if audio:  # the sequences are clips, and the tokens their decoder's
        record["calibration_data"] = "audio"
        record["calibration_transcripts"] = "given" if has_transcripts(Path(calibration).expanduser()) \
            else "the source's greedy decoding"
        if audio_inputs is not None and audio_inputs.languages:  # clips per language token of the prompts
            record["calibration_languages"] = audio_inputs.languages
    if stream is not None:
        record["calibration_mode"] = options.calibration_mode
    if options.refine_steps:
        record["refine_steps"], record["refine_lr"] = options.refine_steps, options.refine_lr
        record["refine_precision"] = options.refine_precision
        if not audio:
            record["refine_batch"] = options.refine_batch
    return stream, record


def _check_calibration(spec, model_type: str, options: ConversionOptions, config: ConfigReader) -> None:
    """Refuse, before any work, a calibration the family or the model cannot run."""
    given = options.calibration
    if spec.audio is not None:
        if not holds_audio(given):
            what = "token ids" if isinstance(given, torch.Tensor) else repr(str(given))
            raise ConversionError(f"calibration for {model_type} takes audio, and {what} is not a folder of wav/flac "
                                  "clips; pass --calibration FOLDER of clips (with a transcripts csv/jsonl, or none "
                                  "to transcribe them with the source) or --calibration none")
        return
    if holds_audio(given):
        raise ConversionError(f"{given} holds audio, and {model_type} calibrates on text; pass --calibration "
                              f"{BUILTIN}, a text file or folder, or none")
    if options.calibration_language is not None:
        raise ConversionError(f"--calibration-language names the language of calibration audio, and {model_type} "
                              "calibrates on text; drop --calibration-language")
    limit = config.get(spec.context_attr) if spec.context_attr else None
    length, setting = (given.shape[1], "the calibration token ids' length") if isinstance(given, torch.Tensor) \
        else (options.calibration_length, "--calibration-length")
    if isinstance(limit, int) and length > limit:
        raise ConversionError(f"{setting} {length} is longer than the model's context of {limit} tokens; "
                              f"calibrate on at most {limit} tokens per sequence")


@dataclass(frozen=True)
class Prepared:
    """Everything a conversion will do, known before any output is written."""

    model_dir: Path
    out: Path
    raw_config: dict
    spec: ArchitectureSpec
    plan: Plan
    how: UnitConversion
    stream: BlockStream | None
    refine: RefineSettings | None
    read: Callable[[str], torch.Tensor]
    shard_bytes: int
    record: dict
    sources: dict
    options: ConversionOptions


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote, in figures (`gqa-convert --json` prints them)."""

    output: Path
    kv_heads_before: int
    kv_heads_after: int  # --groups (a kind named in --kind-groups has its own, in `kinds`)
    kv_cache_bytes_per_token_before: int  # K and V of every converted attention kind, all layers, one token
    kv_cache_bytes_per_token_after: int
    bytes_written: int
    # refinement: each attention unit's relative output error ("kind.layer" -> [before, after]); empty without
    refinement_error: dict[str, list[float]] = field(default_factory=dict)
    # each converted kind's KV heads and KV-cache bytes per token, before and after (`kind_figures`)
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_json(self) -> dict:
        before, after = self.kv_cache_bytes_per_token_before, self.kv_cache_bytes_per_token_after
        return {"output": str(self.output), "kv_heads_before": self.kv_heads_before,
                "kv_heads_after": self.kv_heads_after, "kv_cache_bytes_per_token_before": before,
                "kv_cache_bytes_per_token_after": after, "kv_cache_saving": 1 - after / before,
                "bytes_written": self.bytes_written, **({"kinds": self.kinds} if self.kinds else {}),
                **({"refinement_error": self.refinement_error} if self.refinement_error else {})}


def kind_figures(planned, spec: ArchitectureSpec, geometries: dict, groups: dict[str, int]) -> dict[str, dict]:
    """Each converted kind's KV heads before and after and, for the kinds that keep a KV cache, K and V of one token
    in all its layers, in bytes of the output's floating dtype."""
    floating = [t.dtype for t in planned if t.dtype.is_floating_point]
    element = (floating[0] if floating else torch.float32).itemsize
    figures = {}
    for kind, g in geometries.items():
        figures[kind] = {"kv_heads_before": g.kv_heads, "kv_heads_after": groups[kind]}
        if spec.attention[kind].cached:
            figures[kind].update({f"kv_cache_bytes_per_token_{when}": 2 * g.num_layers * heads * g.head_dim * element
                                  for when, heads in (("before", g.kv_heads), ("after", groups[kind]))})
    return figures


def _kind_groups(options: ConversionOptions, spec: ArchitectureSpec, geometries: dict, model_type: str) -> dict:
    """kind -> G for the converted kinds, each checked against its heads; --kind-groups names only converted kinds,
    and kinds that share a config attribute for their KV heads get one G."""
    for kind in options.kind_groups:
        if kind not in geometries:
            scopes = [s for s, kinds in spec.scopes.items() if kind in kinds]
            hint = f"add --attention {scopes[0]}" if scopes else f"{model_type} has no {kind!r} attention"
            raise ConversionError(f"--kind-groups names {kind!r}, which this conversion does not convert (it "
                                  f"converts {', '.join(geometries)}); {hint}, or drop {kind}=")
    groups = {kind: options.groups_of(kind) for kind in geometries}
    for kind, geometry in geometries.items():
        if kind in options.kind_groups:
            check_groups(groups[kind], geometry, spec, f"--kind-groups {kind}", f"the checkpoint's {kind} attention's")
        else:
            check_groups(groups[kind], geometry, spec)
    shared: dict[str, str] = {}
    for kind in geometries:
        attr = spec.kv_heads_attr_of(kind)
        if attr in shared and groups[shared[attr]] != groups[kind]:
            raise ConversionError(f"{model_type}'s config holds one KV-head count ({attr}) for its "
                                  f"{shared[attr]} and {kind} attention, so they cannot have their own G; drop "
                                  f"--kind-groups")
        shared.setdefault(attr, kind)
    return groups


def _prepare(src, dst, options: ConversionOptions, progress: bool, calibrate: bool = True) -> Prepared:
    model_dir = resolve_model_dir(src, options.revision)
    raw_config = read_raw_config(model_dir)
    spec = spec_for(raw_config["model_type"])
    if spec.modeling is not None:
        from gqa_toolkit.families import modeling  # noqa: F401  registers the GQA classes (4 s of imports only families like gpt2 need)
    scope = options.attention or spec.default_scope
    config = SourceConfig(raw_config, spec.config, load=lambda: load_transformers_config(model_dir))
    geometries = read_geometries(config, spec, scope)
    groups = _kind_groups(options, spec, geometries, raw_config["model_type"])
    out = Path(dst).expanduser().resolve() if dst is not None \
        else default_output(model_dir, options, spec.default_scope)
    check_output_free(out, options.force, model_dir)

    reader = CheckpointReader(model_dir)
    sources = {name: SourceTensor(info.dtype, info.shape, ByteSpan(info.file, *info.offsets) if info.offsets else None)
               for name, info in reader.infos.items()}
    stream, record_options = _calibration_stream(model_dir, config, raw_config, spec, list(sources), geometries,
                                                 options, progress, calibrate)
    if options.preserve_norm:
        record_options["preserve_norm"] = True
    native = _native_target(spec, config, options, set(groups.values()))
    plan = plan_conversion(sources, spec, geometries, groups, dtype=options.dtype,
                           per_layer=options.per_layer, native=native)
    ropes = {b.attention: rope_layout(b.rope, config, geometries[b.attention].head_dim)
             for b in spec.blocks if b.attention in geometries} if options.per_layer else {}
    how = UnitConversion(options.method, options.seed, options.grouping, options.preserve_norm,
                         options.per_layer, rows_first=native is not None, ropes=ropes)
    shard_bytes = options.max_shard_size or max(p.stat().st_size for p in reader.files)
    record = conversion_record(method=options.method, groups=options.groups, source=str(model_dir),
                               geometries=geometries, scope=scope, seed=options.seed, dtype=options.dtype,
                               options=record_options)
    if options.kind_groups:
        record["kind_groups"] = groups  # every converted kind's G
    if native is not None:
        record["native"] = native.model_type
        record["native_config"] = {attr: config.get(attr) for attr in native.copy_config}
    if hub := hub_source(model_dir):
        record["source_repo"], record["source_revision"] = hub["repo"], hub["revision"]
    record["kinds"] = kind_figures(plan.outputs, spec, geometries, groups)
    cached = [f for f in record["kinds"].values() if "kv_cache_bytes_per_token_before" in f]
    record["kv_cache_bytes_per_token_source"] = sum(f["kv_cache_bytes_per_token_before"] for f in cached)
    record["kv_cache_bytes_per_token"] = sum(f["kv_cache_bytes_per_token_after"] for f in cached)
    refine = (RefineSettings(options.refine_steps, options.refine_lr, options.refine_precision == "bf16")
              if options.refine_steps else None)
    return Prepared(model_dir, out, raw_config, spec, plan, how, stream, refine, reader.read, shard_bytes, record,
                    sources, options)


def _native_target(spec: ArchitectureSpec, config: ConfigReader, options: ConversionOptions, groups: set[int]):
    """The stock family the output is written as, when the spec names one that holds it exactly (every kind's G
    among its `groups`); else None."""
    native = spec.native
    if native is None or not options.native or not groups <= set(native.groups) or options.per_layer:
        return None
    if config.model_type == (spec.modeling.model_type if spec.modeling else None):
        return None  # an earlier toolkit output stays the toolkit's family
    return native if all(config.get(k) == v for k, v in native.requires.items()) else None


def _options(options: ConversionOptions | None, kwargs: dict) -> ConversionOptions:
    if options is not None and kwargs:
        raise TypeError(f"pass either options or keyword options, not both ({', '.join(kwargs)})")
    return options if options is not None else ConversionOptions(**kwargs)


def convert_checkpoint(src: str | Path, dst: str | Path | None = None, options: ConversionOptions | None = None, *,
                       progress: bool = True, **kwargs) -> Path:
    """Convert the checkpoint at `src` (a model directory or hub id) to `options.groups` KV heads; returns the
    output dir. The options come as a `ConversionOptions` or as its fields by keyword:
    `convert_checkpoint("llama-7b", method="mean", groups=8)`. `describe_conversion` takes the same arguments and
    writes nothing; `convert` returns the figures of what was written."""
    return convert(src, dst, options, progress=progress, **kwargs).output


def convert(src: str | Path, dst: str | Path | None = None, options: ConversionOptions | None = None, *,
            progress: bool = True, **kwargs) -> ConversionResult:
    """`convert_checkpoint`, returning the output dir with its KV heads, KV-cache bytes and bytes written."""
    options = _options(options, kwargs)
    if options.calibrated and options.per_layer:  # what the dry run refuses (past the device's memory) never starts
        from .plan.dry_run import describe

        describe(_prepare(src, dst, options, progress=False, calibrate=False))
    p = _prepare(src, dst, options, progress)
    total = planned_bytes(p.plan.outputs)
    check_free_space(p.out, total, "--output", ConversionError)
    with disk_writes(f"the output {p.out}", "--output", ConversionError, path=p.out.parent), \
            atomic_directory(p.out, p.options.force, p.model_dir) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                 desc=f"gqa-convert {p.options.method} G={p.options.groups}") as bar:
        with CheckpointWriter(tmp, p.plan.outputs, p.shard_bytes, on_bytes=bar.update) as writer:
            errors = run_conversion(p.plan, p.read, writer, p.how, p.stream, p.refine)
        if errors:
            p.record["refinement_error"] = errors  # attention-output error per unit: [before, after]
            p.record["refinement_error_mean"] = [sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1)]
        write_metadata(p.model_dir, tmp, p.raw_config, p.spec, p.record)
    return ConversionResult(p.out, p.record["source_kv_heads"], p.options.groups,
                            p.record["kv_cache_bytes_per_token_source"], p.record["kv_cache_bytes_per_token"], total,
                            errors, p.record["kinds"])


def describe_conversion(src: str | Path, dst: str | Path | None = None, options: ConversionOptions | None = None,
                        **kwargs) -> list[str]:
    """What `convert_checkpoint(src, dst, options)` would do, as lines, with nothing written and no calibration
    run; a ConversionError when the disk or the calibration device has too little room, with the numbers."""
    from .plan.dry_run import describe

    return describe(_prepare(src, dst, _options(options, kwargs), progress=False, calibrate=False))


def refresh_modeling(model_dir: str | Path) -> list[Path]:
    """Rewrite the toolkit's modeling files in an earlier output (of a family the toolkit models itself: t5,
    bart, whisper, gpt2, ...) with this version's, each file replaced atomically; weights and config are left as they are."""
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
