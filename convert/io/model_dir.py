"""Finding a checkpoint: a local model directory, or a hub id, resolved by huggingface_hub (from its cache when the
machine is offline or HF_HUB_OFFLINE is set, pinned to a branch, tag or commit by `revision`). Every stage that
names a model resolves it here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConversionError

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
