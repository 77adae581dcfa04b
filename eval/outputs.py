"""gqa-eval's writes go through gqa_toolkit.disk: files appear whole or not at all, and a disk fault while
writing is one EvalError line naming the file and the setting to change (e.g. 'another results_dir')."""

from __future__ import annotations

from pathlib import Path

from gqa_toolkit import disk

from .errors import EvalError


def write_fault(where: Path | str | None, exc: BaseException, destination: str = "another destination") -> EvalError:
    """The one-line error for a write that failed: what was being written, why, and what to do."""
    return EvalError(disk.write_fault_message(where, exc, destination))


def disk_writes(path: Path, destination: str):
    """Turn a disk fault inside the block (from any library that writes `path`) into a one-line EvalError."""
    return disk.disk_writes(path, destination, EvalError)


def write_files(files: dict[Path, bytes | str], destination: str = "another destination") -> None:
    """Write every file or none; a disk fault becomes an EvalError naming the file."""
    try:
        disk.write_files(files)
    except OSError as exc:
        raise write_fault(exc.filename, exc, destination) from None
