"""Writing to disk: a failed write becomes one line that says why (disk full, read-only, no permission) and what
to do, and text files are replaced atomically, so a write cut short never leaves half a file behind.

    with disk_writes(final_dir, "checkpoint", "output.dir", cleanup=remove_tmp):
        ...  # torch.save, safetensors, open(): a disk fault in here is an UptrainError
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import UptrainError

# errno -> what went wrong, and the fix (with the recipe key that chooses the folder)
_FAULTS = {
    errno.ENOSPC: ("the disk is full", "free space there and rerun the same command (a run resumes from its last "
                                       "complete checkpoint), or set {key} to a folder on a bigger disk"),
    errno.EDQUOT: ("the disk quota is used up", "free space within the quota and rerun the same command, or set {key} "
                                                "to a folder on another disk"),
    errno.EROFS: ("the filesystem is read-only", "set {key} to a folder on a writable disk"),
    errno.EACCES: ("permission denied", "set {key} to a folder you can write to, or fix its permissions"),
    errno.EPERM: ("permission denied", "set {key} to a folder you can write to, or fix its permissions"),
}
# A write that failed on a filesystem with less room than this most likely failed because the disk is full.
_NEARLY_FULL_BYTES = 1 << 20


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _errno_in(error: BaseException) -> int | None:
    """The fault's errno, from an OSError or from the text of the exceptions that wrap one (safetensors writes
    'No space left on device (os error 28)', torch 'open file failed with strerror: Read-only file system')."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _FAULTS:
            return e.errno
        text = str(e)
        for code in _FAULTS:
            if os.strerror(code) in text or f"(os error {code})" in text:
                return code
    return None


def _filesystem_fault(path: Path) -> int | None:
    """What the filesystem under `path` says now: torch's zip writer reports a full disk only as `unexpected pos`."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    try:
        fs = os.statvfs(existing)
    except (OSError, AttributeError):  # no statvfs on this platform
        return None
    if fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if fs.f_bavail * fs.f_frsize < _NEARLY_FULL_BYTES:
        return errno.ENOSPC
    folder = existing if existing.is_dir() else existing.parent
    return None if os.access(folder, os.W_OK) else errno.EACCES


def disk_fault(error: BaseException, path: Path) -> int | None:
    """The errno of the disk fault (full, read-only, no permission) behind `error` while writing `path`, else None."""
    return _errno_in(error) or _filesystem_fault(Path(path))


def fault_message(code: int, what: str, path: Path, key: str) -> str:
    problem, fix = _FAULTS[code]
    return f"cannot write {what} {path}: {problem}; {fix.format(key=key)}"


@contextmanager
def disk_writes(path: Path, what: str, key: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block's writes; on any exception run `cleanup` (remove the partial output), and turn a disk fault into
    an UptrainError naming `what`, `path` and the fix. Other exceptions pass through unchanged."""
    try:
        yield
    except Exception as e:
        # diagnose before cleanup, which frees the space the partial write took
        code = None if isinstance(e, UptrainError) else disk_fault(e, path)
        if cleanup is not None:
            with suppress(OSError):  # a read-only disk refuses the cleanup too, but got nothing written
                cleanup()
        if code is None:
            raise
        raise UptrainError(fault_message(code, what, path, key)) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` whole or not at all (a temporary sibling renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
