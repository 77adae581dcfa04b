"""`ConversionOptions`: what a conversion is asked to do, validated once, from the CLI through the API to the planner.

Every value is checked and normalised when the object is made (dtype and device names become torch objects, a
shard size with its unit becomes bytes, the calibration default follows the method), so nothing downstream checks
an option again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError
from gqa_toolkit.dtypes import DTYPES
from gqa_toolkit.corpus import NAME as BUILTIN
from .methods.refinement import resolve_precision
from .methods.registry import LayerMethod, check_method, layer_methods

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# source: every layer calibrated on the source's activations; sequential: each layer on the outputs of the
# converted layers before it, so later layers make up for earlier ones' errors
CALIBRATION_MODES = ("source", "sequential")


@dataclass(frozen=True, eq=False)
class ConversionOptions:
    groups: int  # KV heads in the output (checked against the source's heads when it is read)
    # attention kind -> its own G, for the kinds named (the others take `groups`): {"cross": 1}, or the CLI's
    # "cross=1,decoder=2"; checked against the family's kinds and each kind's heads when the source is read
    kind_groups: dict[str, int] | str | None = None
    method: str = "mean"
    grouping: str = "contiguous"  # or "similarity": the most alike heads share a group
    preserve_norm: bool = False  # scale each pooled head to its group's mean head norm
    # text whose activations weigh the errors: BUILTIN, a text file or folder, token ids (N, T), or "none";
    # None: BUILTIN for the calibrated methods (fit), "none" otherwise
    calibration: str | Path | torch.Tensor | None = None
    calibration_samples: int = 256
    calibration_length: int = 128
    calibration_mode: str = "source"
    # audio calibration of a multilingual whisper: the language token of its decoder prompt ("en"); None: the source
    # detects each clip's language, as whisper's generate() does
    calibration_language: str | None = None
    refine_steps: int = 0  # after the method, train each unit against the source's attention output (0: off)
    refine_lr: float = 0.01  # Adam's step, relative to each tensor's RMS
    # text calibration sequences per refinement step (the stream's batch; its last batch is held out): smaller
    # batches make each step cheaper, and more steps at the same cost fit closer (docs/real-checkpoints.md)
    refine_batch: int = 8
    # the training steps' arithmetic: bf16 autocast (projections in bf16, the attention core and the error that picks
    # the result in float32), fp32, or auto: bf16 where --device multiplies bf16 in hardware (computes_bf16)
    refine_precision: str = "auto"
    device: str | torch.device = "auto"  # where calibration runs: auto (the GPU when there is one), cpu, cuda[:N]
    attention: str | None = None  # which attention kinds (the family's scopes); None: the family's default
    seed: int = 0
    dtype: str | torch.dtype | None = None  # output dtype of floating tensors; None keeps the source's
    max_shard_size: str | int | None = None  # bytes, or with a unit ("5GB"); None: the source's largest file
    force: bool = False  # replace an earlier output of the toolkit
    revision: str | None = None  # the source's hub revision (branch, tag or commit), for a hub id
    native: bool = True  # write a stock family when one holds the output exactly (gpt2 at G=1 as gpt_bigcode)

    def __post_init__(self):
        check_types(self)
        check_method(self.method, self.grouping, self.preserve_norm)
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ConversionError(f"unknown --calibration-mode {self.calibration_mode!r}; choose one of: "
                                  f"{', '.join(CALIBRATION_MODES)}")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConversionError(f"--refine-steps {self.refine_steps!r} must be a whole number, at least 0 (0: off)")
        if self.refine_batch < 1:
            raise ConversionError(f"--refine-batch {self.refine_batch} must be at least 1 calibration sequence")
        if not isinstance(self.refine_lr, (int, float)) or not 0 < self.refine_lr < float("inf"):
            raise ConversionError(f"--refine-lr {self.refine_lr!r} must be a positive number (default 0.01)")
        calibration = self.calibration
        if calibration is None:
            layer = self.layer_method
            calibration = BUILTIN if (layer is not None and layer.calibrated) or self.refine_steps else "none"
        normalised = dict(kind_groups=parse_kind_groups(self.kind_groups), dtype=parse_dtype(self.dtype),
                          device=parse_device(self.device), calibration=calibration,
                          max_shard_size=parse_size(self.max_shard_size) if self.max_shard_size is not None else None)
        normalised["refine_precision"] = resolve_precision(self.refine_precision, normalised["device"])
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        if self.calibrated and not self.per_layer:
            raise ConversionError(f"--calibration applies to the layer methods (aligned, fit) and --grouping "
                                  f"similarity; {self.method} with contiguous groups reads weights only, drop "
                                  f"--calibration")
        if self.refine_steps and not self.calibrated:
            raise ConversionError(f"--refine-steps trains on calibration activations, and --calibration is none; "
                                  f"give calibration text (--calibration {BUILTIN}) or drop --refine-steps")
        if self.calibration_language is not None and not self.calibrated:
            raise ConversionError("--calibration-language names the language of calibration audio, and --calibration "
                                  "is none here; give a folder of clips (--calibration CLIPS) or drop "
                                  "--calibration-language")
        if self.calibration_mode == "sequential" and not self.calibrated:
            raise ConversionError(f"--calibration-mode sequential says which activations calibrate the layers, and "
                                  f"--method {self.method} here calibrates on none; give calibration text "
                                  f"(--calibration {BUILTIN}) or drop --calibration-mode")
        if isinstance(self.calibration, torch.Tensor) and self.calibration.dim() != 2:
            raise ConversionError(f"calibration token ids have shape {tuple(self.calibration.shape)}; give a "
                                  f"(sequences, tokens) tensor, e.g. ids[None] for one sequence")
        if isinstance(self.calibration, torch.Tensor) and (self.calibration.dtype.is_floating_point or
                                                           self.calibration.dtype.is_complex or
                                                           self.calibration.dtype == torch.bool):
            raise ConversionError(f"calibration token ids are {str(self.calibration.dtype).removeprefix('torch.')}; "
                                  f"give integer ids (e.g. ids.long())")
        if self.calibrated:
            if self.calibration_samples < 1:
                raise ConversionError(f"--calibration-samples {self.calibration_samples} must be at least 1 "
                                      f"(default 256)")
            if self.calibration_length < 2:
                raise ConversionError(f"--calibration-length {self.calibration_length} must be at least 2 tokens "
                                      f"(default 128)")

    def groups_of(self, kind: str) -> int:
        """G for one attention kind: its own when --kind-groups names it, else --groups."""
        return self.kind_groups.get(kind, self.groups)

    @property
    def layer_method(self) -> LayerMethod | None:
        return layer_methods().get(self.method)

    @property
    def per_layer(self) -> bool:
        """Q, K, V and O are converted together, a layer at a time (a layer method, similarity grouping, or
        refinement, which trains them together)."""
        return self.layer_method is not None or self.grouping != "contiguous" or self.refine_steps > 0

    @property
    def calibrated(self) -> bool:
        return not (isinstance(self.calibration, str) and self.calibration == "none")

    def output_suffix(self, default_scope: str) -> str:
        """The default output's name after the source's: `-gqa8-mean`, plus `-similarity`, `-norm` and
        `-attention-all` (an --attention other than the family's default) when set."""
        options = ("-similarity" if self.grouping == "similarity" else "") + ("-norm" if self.preserve_norm else "")
        options += f"-attention-{self.attention}" if self.attention not in (None, default_scope) else ""
        options += f"-refined{self.refine_steps}" if self.refine_steps else ""
        kinds = "".join(f"-{kind}{g}" for kind, g in self.kind_groups.items())
        return f"-gqa{self.groups}{kinds}-{self.method}{options}"


def parse_kind_groups(given: dict[str, int] | str | None) -> dict[str, int]:
    """{kind: G} from a mapping or from "cross=1,decoder=2"; every kind one of some family's attention kinds
    (the source's family is checked when it is read) and every G a positive whole number."""
    from gqa_toolkit.families.spec import all_specs

    example = "e.g. --kind-groups cross=1 (kind_groups={'cross': 1})"
    if given is None:
        return {}
    if isinstance(given, str):
        pairs = [part.split("=", 1) for part in given.split(",") if part.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ConversionError(f"cannot read --kind-groups {given!r}; write KIND=G pairs separated by commas, "
                                  f"{example}")
        given = {kind.strip(): g.strip() for kind, g in pairs}
        given = {kind: int(g) if g.isdigit() else g for kind, g in given.items()}
    if not isinstance(given, dict):
        raise ConversionError(f"kind_groups {given!r} must map attention kinds to G, {example}")
    known = sorted({kind for spec in all_specs().values() for kind in spec.attention})
    for kind, g in given.items():
        if kind not in known:
            raise ConversionError(f"--kind-groups names {kind!r}, which is no attention kind; choose among "
                                  f"{', '.join(known)}, {example}")
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConversionError(f"--kind-groups {kind}={g} must be a positive whole number of KV heads, {example}")
    return dict(given)


# The fields that must hold exactly these types (bool is not an int here: groups=True is a mistake, not 1 KV head)
_TYPED = {"groups": int, "calibration_samples": int, "calibration_length": int, "seed": int, "method": str,
          "grouping": str, "calibration_mode": str, "refine_batch": int, "refine_precision": str, "preserve_norm": bool, "force": bool, "native": bool}
_OPTIONAL = {"attention": str, "revision": str, "calibration_language": str}


def check_types(options: ConversionOptions) -> None:
    """Refuse a value of the wrong type where it enters (the API's keywords reach here unchecked by click)."""
    def named(kind: type) -> str:
        return {int: "a whole number", str: "a string", bool: "True or False"}[kind]

    for name, kind in [*_TYPED.items(), *_OPTIONAL.items()]:
        value = getattr(options, name)
        if value is None and name in _OPTIONAL:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConversionError(f"{name}={_short(value)} must be {named(kind)} (got a {type(value).__name__})")
    if options.groups < 1:
        raise ConversionError(f"groups={options.groups} must be at least 1 (the KV heads to keep)")
    if options.seed < 0:
        raise ConversionError(f"seed={options.seed} must be 0 or more")
    calibration = options.calibration
    if calibration is not None and not isinstance(calibration, (str, Path, torch.Tensor)):
        raise ConversionError(f"calibration must be a name, a path or a (sequences, tokens) tensor of token ids, "
                              f"not a {type(calibration).__name__}")
    if options.max_shard_size is not None and (isinstance(options.max_shard_size, bool) or
                                               not isinstance(options.max_shard_size, (str, int))):
        raise ConversionError(f"max_shard_size must be bytes or a size with a unit like '5GB', not a "
                              f"{type(options.max_shard_size).__name__}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None:
        return name
    if isinstance(name, torch.dtype):
        if name not in (*DTYPES.values(), torch.float64):
            raise ConversionError(f"dtype {str(name).removeprefix('torch.')} cannot hold converted weights (the "
                                  f"methods average in floating point); choose one of: {', '.join(DTYPES)}")
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    """`auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`."""
    if isinstance(name, torch.device):
        if name.type not in ("cpu", "cuda"):
            raise ConversionError(f"device {str(name)!r} cannot run calibration; choose auto, cpu, cuda or cuda:N")
        return parse_device(str(name))
    if not isinstance(name, str):
        raise ConversionError(f"device must be a name such as 'cpu' or 'cuda:0', not a {type(name).__name__}")
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
