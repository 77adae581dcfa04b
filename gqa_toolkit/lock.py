"""One writer per folder: a hidden `.NAME.lock` sibling held with flock(2) while a run writes NAME.

A second run (another process, or another thread of this one) that asks for the same folder is refused at once in
one line, instead of the two interleaving their files. The lock dies with its process, so SIGKILL leaves no stale
lock: the file stays, empty, and the next run takes it over and removes it when done.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def exclusive(folder: Path, refused: str, error: type[Exception]) -> Iterator[None]:
    """Hold `folder`'s lock for the block; `error(refused)` at once when another writer holds it. The folder's
    parent must exist."""
    path = lock_path(folder)
    while True:
        # read-only: flock needs no write access, and a file open for writing would keep the disk from a remount
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise error(refused) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the file we locked is still the lock (the last holder may have removed it meanwhile)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)  # while still held, so that no one locks a file about to vanish
        except OSError:
            pass
        os.close(fd)
