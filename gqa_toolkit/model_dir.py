"""Finding a checkpoint and reading it once: a local model directory, or a hub id, resolved by huggingface_hub (from
its cache when the machine is offline or HF_HUB_OFFLINE is set, pinned to a branch, tag or commit by `revision`);
`ModelDir`, the folder as uptraining, evaluation and the ablation read it. Every stage that names a model resolves
it here."""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ConversionError, ToolkitError, first_line
from .records import CONVERSION_KEY

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str | Path, revision: str | None = None, error: type[Exception] = ConversionError,
                      role: str = "") -> Path:
    """The local directory of `model` (a path, or a hub id); `error(one line)` when there is none. `role` names
    the setting in messages (e.g. "model.path: ")."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise error(f"{role}{path} is a file; pass the model directory that holds config.json")
        if revision is not None:
            raise error(f"{role}{path} is a local directory; --revision picks a hub revision, drop it")
        return path.resolve()
    if is_hub_id(model):
        return _download(str(model), revision, error, role)
    raise error(f"{role}no such model directory: {path}; pass a local Hugging Face model directory "
                f"(or a hub id like org/name, from the hub cache or the network)")


def is_hub_id(model: str | Path) -> bool:
    """`model` names a hub repository (org/name), not something on this disk."""
    path = Path(model).expanduser()
    return bool(HUB_ID.match(str(model))) and not path.exists() and not _looks_local(path)


def hub_cache_repo(model_dir: Path) -> Path | None:
    """The repository folder (`models--org--name`) when `model_dir` is a snapshot in a hub cache, else None."""
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent
    return None


def _looks_local(path: Path) -> bool:
    """`runs/model` whose `runs/` exists here is a mistyped local path, not a hub id."""
    return str(path).startswith((".", "~")) or path.parent.is_dir() and path.parent != Path(".")


def _download(repo_id: str, revision: str | None, error: type[Exception], role: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.md",
                                                      "*.tiktoken"]))
    except Exception as exc:  # network, auth, missing repo or revision: all reported the same way
        cache = cache_fault(exc)
        if cache:
            raise error(f"{role}{cache}") from None
        pinned = f" at revision {revision!r}" if revision else ""
        raise error(f"{role}{repo_id!r}{pinned} is not a local directory, and neither the hub cache nor the hub "
                    f"gave it ({type(exc).__name__}); check the name, or download the model and pass its "
                    f"directory") from None


def cache_fault(exc: BaseException) -> str | None:
    """The message for a hub or datasets cache that cannot be used (HF_HOME a file, an unwritable HOME), found in
    `exc` or what it wraps; None when the fault is something else."""
    seen = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError)) and \
                seen.filename:
            return (f"cannot use the Hugging Face cache at {seen.filename} ({seen.strerror}); set HF_HOME to a "
                    f"writable folder (it holds the hub and datasets caches)")
        seen = seen.__cause__ or seen.__context__
    return None


def hub_source(model_dir: Path) -> dict[str, str]:
    """`{"repo": "org/name", "revision": commit}` for a snapshot in a hub cache; empty for other directories."""
    repo = hub_cache_repo(model_dir)
    if repo is None:
        return {}
    return {"repo": "/".join(repo.name.split("--")[1:]), "revision": model_dir.name}  # models--org--name


def read_raw_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir} has no config.json; point at a Hugging Face model directory "
                              f"(the one save_pretrained wrote)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path} is not UTF-8 text (byte {exc.start}); fix or re-download it") from None
    except OSError as exc:
        raise ConversionError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; fix or "
                              f"re-download it")
    if "model_type" not in config:
        raise ConversionError(f"{path} has no model_type; it is not a transformers model config")
    if not isinstance(config["model_type"], str) or not 0 < len(config["model_type"]) <= 100:
        raise ConversionError(f"{path} has model_type {short_value(config['model_type'])}, not a name such as "
                              f"\"llama\"; fix it")
    return config


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to part of a line for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_value(value: Any, limit: int = 60) -> str:
    """A config value as JSON, cut to part of a line for a message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


WEIGHT_FILES = ("*.safetensors", "*.bin")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a model checkpoint, or None when it is one."""
    if not path.exists():
        return "is missing"
    if not path.is_dir():
        return "is a file, not a model directory"
    if not (path / "config.json").is_file():
        return "has no config.json"
    if not any(any(path.glob(p)) for p in WEIGHT_FILES):
        return "holds no weights (*.safetensors or *.bin)"
    return None


class ModelDir:
    """A checkpoint folder that uptraining, evaluation and the ablation read, checked once when opened: its
    config.json is read once (the raw settings, then transformers' config on first use) and its tokenizer loaded
    once. `role` names it in messages (`model.path`, `MODEL_DIR`, `--source`); `error` is the calling stage's
    exception class, so each command reports it as its own."""

    def __init__(self, path: Path, role: str, error: type[ToolkitError]):
        self.path, self.role, self.error = path, role, error

    @classmethod
    def open(cls, given: str | Path, role: str, wanted: str, error: type[ToolkitError]) -> ModelDir:
        """The model folder `given` (a hub id resolves through the hub cache or the network), or a one-line error
        saying why it is not one and to pass `wanted`."""
        return cls._checked(given, f"{role}:", role, f"pass {wanted}", error)

    @classmethod
    def _checked(cls, given, named: str, role: str, fix: str, error: type[ToolkitError]) -> ModelDir:
        if is_hub_id(given):
            given = resolve_model_dir(given, error=error, role=f"{role}: ")
        path = Path(given).expanduser()
        problem = checkpoint_problem(path)
        if problem:
            raise error(f"{named} {path} {problem}; {fix}")
        return cls(path.resolve(), role, error)

    @cached_property
    def settings(self) -> dict[str, Any]:
        """config.json as written."""
        try:
            return read_raw_config(self.path)
        except ConversionError as e:
            raise self.error(f"{self.role}: {e}") from None

    @cached_property
    def config(self):
        """transformers' config for the folder (the toolkit's own families included)."""
        from transformers import AutoConfig

        from .families.loading import from_pretrained

        try:
            return from_pretrained(AutoConfig, self.path)
        except (ValueError, OSError, TypeError) as e:
            raise self.error(f"{self.role}: transformers cannot read {self.path / 'config.json'}: "
                             f"{first_line(e)}") from None

    @property
    def takes_audio(self) -> bool:
        from .families.spec import audio_input

        return audio_input(self.config.model_type) is not None

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        from .families.loading import from_pretrained

        try:
            tokenizer = from_pretrained(AutoTokenizer, self.path)
        except (ValueError, OSError, TypeError) as e:
            raise self.error(f"{self.path} has no usable tokenizer ({first_line(e)}); copy the source model's "
                             "tokenizer files into it") from None
        if tokenizer.eos_token_id is None:
            raise self.error(f"the tokenizer in {self.path} has no eos token, which packing puts between documents; "
                             "set eos_token in its tokenizer_config.json")
        return tokenizer

    @property
    def conversion(self) -> dict[str, Any] | None:
        """The record gqa-convert wrote into config.json, if any."""
        record = self.settings.get(CONVERSION_KEY)
        return record if isinstance(record, dict) else None

    @property
    def recorded_source(self) -> str | None:
        return (self.conversion or {}).get("source") or None

    def source(self, given: str | Path | None, role: str, fix: str, required: bool = True) -> ModelDir | None:
        """The MHA checkpoint this folder was converted from: `given`, else the one gqa-convert recorded; None when
        neither is there and it is not `required`. `fix` says what to pass instead."""
        if given:
            return ModelDir._checked(given, role, role, fix, self.error)
        recorded = self.recorded_source
        if not recorded:
            if not required:
                return None
            raise self.error(f"{self.path} records no conversion source ({CONVERSION_KEY}.source in config.json); "
                             f"{fix}")
        problem = checkpoint_problem(Path(recorded))
        if problem:
            raise self.error(f"the MHA source checkpoint recorded by gqa-convert ({CONVERSION_KEY}.source in "
                             f"{self.path / 'config.json'}), {recorded}, {problem}; {fix}")
        return ModelDir(Path(recorded).resolve(), role, self.error)

    def preflight(self, block_size: int | None = None, setting: str = "", text_only: bool = False) -> int | None:
        """The checks every stage makes before it loads weights or data, in one place: the folder's config reads;
        a model whose encoder takes audio is refused where only text can feed it (`text_only`); a text model's
        context holds `block_size`, when one is given (named `setting` in the message); the tokenizer loads, has eos, and has no id
        past the model's embeddings. Returns the positions in one example: `block_size`, or an audio encoder's
        whole window."""
        from .families.geometry import check_context
        from .families.spec import audio_input

        audio = audio_input(self.config.model_type)
        if audio is not None and text_only:
            raise self.error(f"this {self.config.model_type} model's encoder takes audio features, and these tasks "
                             "are text; score it on (audio, transcript) pairs with gqa-eval wer, perplexity or "
                             "fidelity")
        if audio is None and block_size is not None:
            check_context(self.config, block_size, setting, self.error)
        self._check_tokenizer_fits()
        return block_size if audio is None else getattr(self.config, audio.positions_attr)

    def _check_tokenizer_fits(self) -> None:
        """Refuse a tokenizer with ids the model has no embedding for: they would fail in the middle of a step."""
        vocab_size = getattr(self.config, "vocab_size", None)
        ids = max(self.tokenizer.get_vocab().values(), default=-1) + 1
        if isinstance(vocab_size, int) and ids > vocab_size:
            raise self.error(f"the tokenizer in {self.path} has {ids} token ids but the model's vocab_size is "
                             f"{vocab_size}, so ids {vocab_size} and up have no embedding; put the tokenizer the model "
                             "was trained with (the source checkpoint's tokenizer files) in it")

    def model(self, dtype=None):
        """The model with its language-model head (seq2seq for encoder-decoders, speech seq2seq for whisper, causal
        for the rest); refused when the checkpoint lacks weights the model needs (transformers would start them
        random), when its shapes disagree with config.json, or when its .bin needs unsafe unpickling."""
        import pickle

        import torch
        import transformers

        from .families.loading import from_pretrained
        from .families.spec import lm_auto_class_name

        config = self.config
        auto = getattr(transformers, lm_auto_class_name(config.model_type, getattr(config, "is_encoder_decoder", False)))
        try:
            model, info = from_pretrained(auto, self.path, dtype=dtype or torch.float32, output_loading_info=True)
        except pickle.UnpicklingError as e:
            raise self.error(f"{self.path}'s .bin weights need unsafe unpickling to load ({first_line(e)}); convert "
                             "them to safetensors from a trusted environment") from None
        except RuntimeError as e:
            if not any(sign in str(e) for sign in ("size mismatch", "shape", "mismatched_sizes")):
                raise
            raise self.error(f"the weights in {self.path} do not fit its config.json (a tensor's shape is not the "
                             "one config.json gives); fix config.json or use the checkpoint it belongs to") from None
        except (ValueError, OSError) as e:
            raise self.error(f"transformers cannot load the model in {self.path}: {first_line(e)}") from None
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise self.error(f"{self.path} lacks {missing[0]}{more}, which the model would start at random; use the "
                             "complete checkpoint (for a separate lm_head, the one its source saved)")
        mismatched = info.get("mismatched_keys") or ()
        if mismatched:
            raise self.error(f"the weights in {self.path} do not fit its config.json ({list(mismatched)[0]}); fix "
                             "config.json or use the checkpoint it belongs to")
        return model
