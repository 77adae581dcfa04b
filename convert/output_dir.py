"""An output directory that appears whole or not at all.

Everything is written into a hidden temporary sibling, renamed into place at the end. An exception, Ctrl-C or
SIGTERM leaves no partial output; an existing directory is replaced only with `force=True`.
"""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConversionError


def check_output_free(dst: Path, force: bool) -> None:
    if dst.exists() and not force:
        raise ConversionError(f"output directory {dst} already exists; pass --force to replace it or choose "
                              f"another --output")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def atomic_directory(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dst` when the block finishes without an exception."""
    check_output_free(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread: leave signal handling alone
        in_main_thread = False
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
