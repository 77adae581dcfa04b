"""Experiment trackers through accelerate's `log_with` (tensorboard, wandb, mlflow), beside the JSONL metrics log
that every run keeps."""

from __future__ import annotations

import importlib.util

from .errors import UptrainError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> what pip installs


def resolve_trackers(names: tuple[str, ...] | None) -> list:
    """The trackers to log to: those the recipe names, each installed (a clear error otherwise); None: tensorboard
    when it is installed, else none."""
    if names is None:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        raise UptrainError(f"output.trackers names {', '.join(missing)}, which is not installed; pip install "
                           f"{' '.join(PACKAGES[n] for n in missing)}, or take it out of output.trackers")
    return list(dict.fromkeys(names))
