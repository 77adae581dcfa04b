"""uptrain's writes go through gqa_toolkit.disk: a disk fault while writing is one UptrainError line."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from gqa_toolkit import disk

from .errors import UptrainError


def disk_writes(path: Path, what: str, key: str, cleanup: Callable[[], None] | None = None):
    """`with disk_writes(step_dir, "checkpoint", "output.dir", cleanup=...)`: see gqa_toolkit/disk.py."""
    return disk.disk_writes(f"{what} {path}", key, UptrainError, path=Path(path), cleanup=cleanup)
