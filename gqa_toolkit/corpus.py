"""The built-in `python-stdlib` corpus: the .py files of the running Python's standard library (about 30 MB).

Files go to train or held-out by a hash of their path relative to the stdlib root, so the split is the same on
every machine and run, and a file never sits in both.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

NAME = "python-stdlib"
HELDOUT_PERCENT = 5  # of files, by path hash
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def stdlib_files(split: str) -> list[Path]:
    """Sorted .py files of the standard library in `split` ('train' or 'heldout')."""
    if split not in ("train", "heldout"):
        raise ValueError(f"python-stdlib has splits 'train' and 'heldout', not {split!r}")
    root = stdlib_root()
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        if _is_heldout(rel.as_posix()) == (split == "heldout"):
            out.append(f)
    return out


def iter_texts(split: str, limit: int | None = None) -> Iterator[dict[str, str]]:
    """Yield {'text', 'path'} records; files that are not UTF-8 are skipped."""
    n = 0
    for f in stdlib_files(split):
        if limit is not None and n >= limit:
            return
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            n += 1
            yield {"text": text, "path": f.relative_to(stdlib_root()).as_posix()}


def fingerprint(split: str, limit: int | None) -> str:
    """What identifies this corpus for the block cache: the Python version, the stdlib location and the file list."""
    files = stdlib_files(split)
    h = hashlib.sha1(f"{sys.version}|{stdlib_root()}|{split}|{limit}|{len(files)}".encode())
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()
