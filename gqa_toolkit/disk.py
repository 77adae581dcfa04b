"""Writing to disk on real machines, for every stage: a write that fails because the disk is full, read-only or not
ours becomes one line naming what, where, why and the setting to change; files appear whole or not at all.

    with disk_writes("checkpoint /runs/x/step-4", "output.dir", UptrainError, path=step_dir, cleanup=remove_tmp):
        ...  # torch.save, safetensors, open(): a disk fault in here is one UptrainError line
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "permission is denied",
}
FIXES = {  # {setting}: the option or recipe key that chooses the folder
    errno.ENOSPC: "free space there, or choose {setting} on a bigger disk",
    errno.EDQUOT: "free space within the quota, or choose {setting} on another disk",
    errno.EROFS: "choose {setting} on a writable disk",
    errno.EACCES: "fix its permissions, or choose {setting} elsewhere",
    errno.EPERM: "fix its permissions, or choose {setting} elsewhere",
}
WRITE_ONLY_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # whatever failed with these was writing
_NEARLY_FULL_BYTES = 1 << 20


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def fault_errno(error: BaseException, path: Path | None = None) -> int | None:
    """The errno of the disk fault behind `error`: an OSError's own, the one a library quotes when it wraps it
    (safetensors: 'No space left on device (os error 28)'), or, with `path`, what its filesystem says now (torch's
    zip writer reports a full disk only as 'unexpected pos')."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in PROBLEMS and not _elsewhere(e, path):
            return e.errno
        if not isinstance(e, OSError):
            text = str(e)
            for code in PROBLEMS:
                if os.strerror(code) in text or f"(os error {code})" in text:
                    return code
    return _filesystem_fault(path) if path is not None else None


def _elsewhere(error: OSError, path: Path | None) -> bool:
    """A permission error on a file outside `path` (an unreadable source shard, say) is not a fault of the
    output being written."""
    if error.errno not in (errno.EACCES, errno.EPERM) or path is None or not error.filename:
        return False
    target = Path(os.fsdecode(error.filename)).resolve()
    return not (target == path.resolve() or target.is_relative_to(path.resolve()))


def _filesystem_fault(path: Path) -> int | None:
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


def fault_message(code: int, where: str | Path, setting: str) -> str:
    return f"cannot write {where}: {PROBLEMS[code]}; {FIXES[code].format(setting=setting)}"


def write_fault_message(where: str | Path | None, exc: BaseException, setting: str = "another destination") -> str:
    """The one line for a write that failed: what was being written (default: the file the error names), why,
    and what to do."""
    where = where or getattr(exc, "filename", None) or "the output"
    code = fault_errno(exc)
    if code is None:
        return f"cannot write {where}: {getattr(exc, 'strerror', None) or exc}; choose {setting}"
    return fault_message(code, where, setting)


@contextmanager
def disk_writes(where: str | Path, setting: str, error: type[Exception], path: Path | None = None,
                cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block's writes; on any exception run `cleanup` (remove the partial output), and turn a disk fault
    into `error(one line)` naming `where` and `setting`. `path` (default `where`) is where the filesystem is asked
    when the exception does not say. Other exceptions, and the stage's own errors, pass through unchanged."""
    try:
        yield
    except Exception as e:
        # diagnose before cleanup, which frees the space the partial write took
        code = None if isinstance(e, error) else fault_errno(e, Path(path if path is not None else where))
        if cleanup is not None:
            with suppress(OSError):  # a read-only disk refuses the cleanup too, but got nothing written
                cleanup()
        if code is None:
            raise
        raise error(fault_message(code, where, setting)) from None


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free


def check_free_space(path: Path, needed: int, setting: str, error: type[Exception]) -> None:
    """Refuse before writing when `path`'s filesystem has less room than the write needs."""
    free = free_bytes(path)
    if free < needed:
        raise error(f"the output at {path} needs {format_bytes(needed)} and its filesystem has "
                    f"{format_bytes(free)} free; free space or choose another {setting}")


def partial_name(name: str, tag: str) -> str:
    """The hidden sibling of `name` that a write stages in before renaming it into place (`tag`: whose write it
    is, or "*" as a glob)."""
    return f".{name}.partial-{tag}"


def is_partial(path: Path, name: str = "*") -> bool:
    """A staged file or folder (of `name`, or of any) that a write cut short left behind."""
    return fnmatch.fnmatchcase(path.name, partial_name(name, "*"))


def partial_path(path: Path) -> Path:
    return path.parent / partial_name(path.name, str(os.getpid()))


def write_files(files: dict[Path, bytes | str]) -> None:
    """Write every file or none: each is staged and flushed in its hidden sibling, then all are renamed into place.
    An OSError names the final file that failed (`filename`), and no staged file is left behind."""
    for path in files:
        if path.is_dir():  # a rename onto it would fail after the other files were replaced
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            tmp = partial_path(path)
            staged.append((tmp, path))
            try:
                with open(tmp, "wb") as f:
                    f.write(data.encode() if isinstance(data, str) else data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                exc.filename = str(path)
                raise
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
