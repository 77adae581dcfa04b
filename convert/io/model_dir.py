"""Finding the source checkpoint: a local model directory, or a hub id fetched when the machine has network."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConversionError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path} is a file; pass the model directory that holds config.json")
        return path.resolve()
    if HUB_ID.match(str(model)) and not _looks_local(path):
        return _download(str(model))
    raise ConversionError(f"no such model directory: {path}; pass a local Hugging Face model directory "
                          f"(or a hub id like org/name on a machine with network)")


def hub_cache_repo(model_dir: Path) -> Path | None:
    """The repository folder (`models--org--name`) when `model_dir` is a snapshot in a hub cache, else None."""
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent
    return None


def _looks_local(path: Path) -> bool:
    """`runs/model` whose `runs/` exists here is a mistyped local path, not a hub id."""
    return str(path).startswith((".", "~")) or path.parent.is_dir() and path.parent != Path(".")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.py", "*.md", "*.tiktoken"]))
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise ConversionError(f"{repo_id!r} is not a local directory, and fetching it from the hub failed "
                              f"({type(exc).__name__}); check the path, or download the model and pass its "
                              f"directory") from None


def read_raw_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir} has no config.json; point at a Hugging Face model directory "
                              f"(the one save_pretrained wrote)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if "model_type" not in config:
        raise ConversionError(f"{path} has no model_type; it is not a transformers model config")
    return config
