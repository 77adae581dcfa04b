"""Files that appear whole or not at all, and one-line messages for the disk faults that stop a write.

Each file is written to a hidden temporary sibling (`.NAME.partial-PID`, same folder, so the rename cannot cross
file systems) and renamed over its final name with os.replace only once every file of the batch is written: a
full disk or a read-only folder leaves the previous files as they were and no partial one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import EvalError

WRITE_FAULTS = {  # errno -> what went wrong, and what to do about it
    errno.ENOSPC: ("the disk is full", "free some space or choose {destination}"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or choose {destination}"),
    errno.EROFS: ("the file system is read-only", "choose {destination} on a writable disk"),
    errno.EACCES: ("permission is denied", "fix its permissions or choose {destination}"),
    errno.EPERM: ("permission is denied", "fix its permissions or choose {destination}"),
}


# The faults that only a write meets: whatever failed with one of these was writing.
WRITE_ONLY_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def fault_errno(exc: BaseException | None) -> int | None:
    """The errno of a disk fault: an OSError's own, or the one a library quotes when it wraps it (safetensors says
    'No space left on device (os error 28)')."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_FAULTS:
            return exc.errno
        if not isinstance(exc, OSError):
            text = str(exc)
            for code in WRITE_FAULTS:
                if f"(os error {code})" in text or os.strerror(code) in text:
                    return code
        exc = exc.__cause__ or exc.__context__
    return None


def write_fault(path: Path | str | None, exc: BaseException, destination: str = "another destination") -> EvalError:
    """The one-line error for a write that failed: what was being written, why, and what to do."""
    code = fault_errno(exc)
    reason, fix = WRITE_FAULTS.get(code, (getattr(exc, "strerror", None) or str(exc), "choose {destination}"))
    where = path or getattr(exc, "filename", None) or "the output"
    return EvalError(f"cannot write {where}: {reason}; {fix.format(destination=destination)}")


@contextmanager
def disk_writes(path: Path, destination: str) -> Iterator[None]:
    """Turn a disk fault inside the block (from any library that writes `path`) into a one-line EvalError."""
    try:
        yield
    except Exception as exc:
        if fault_errno(exc) is None:
            raise
        raise write_fault(path, exc, destination) from None


def _partial(path: Path) -> Path:
    return path.parent / f".{path.name}.partial-{os.getpid()}"


def _stage(path: Path, data: bytes) -> Path:
    """`data` written and flushed to disk in the temporary sibling of `path`; nothing is left if that fails."""
    tmp = _partial(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: Path) -> None:
    with suppress(OSError):
        path.unlink(missing_ok=True)


def write_files(files: dict[Path, bytes | str], destination: str = "another destination") -> None:
    """Write every file or none. A disk fault becomes an EvalError naming the file; `destination` names the
    setting to change (e.g. 'another results_dir')."""
    staged: list[tuple[Path, Path]] = []
    current = None
    try:
        for current, data in files.items():
            staged.append((_stage(current, data.encode() if isinstance(data, str) else data), current))
        for tmp, current in staged:
            os.replace(tmp, current)
    except OSError as exc:
        raise write_fault(current, exc, destination) from None
    finally:
        for tmp, _ in staged:
            _remove(tmp)
