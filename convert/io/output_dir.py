"""An output directory that appears whole or not at all.

Everything is written into a hidden temporary sibling, renamed into place at the end. An exception, Ctrl-C or
SIGTERM leaves no partial output, and a later run removes what SIGKILL left. The source is never the output, above
it or below it; an existing directory is replaced only with `force=True`, and only if it is the toolkit's output.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from gqa_toolkit.interrupts import sigterm_interrupts

from ..errors import ConversionError
from .disk import partial_name
from .records import CONVERSION_KEY


def is_own_output(path: Path) -> bool:
    """Whether `path` is a directory that gqa-convert (or gqa-uptrain after it) wrote: its config.json carries the
    conversion record."""
    try:
        return CONVERSION_KEY in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output_free(dst: Path, force: bool, source: Path | None = None) -> None:
    """Refuse an output that would replace, hold or sit inside the source, and an existing directory unless
    `force` is set and the directory is the toolkit's own output."""
    if source is not None:
        source = source.resolve()
        if dst == source or dst in source.parents:
            raise ConversionError(f"--output {dst} is {'the source' if dst == source else 'a folder above the source'}"
                                  f" {source}, which is never replaced; choose an --output outside it")
        if source in dst.parents:
            raise ConversionError(f"--output {dst} is inside the source {source}; choose an --output outside it")
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        return
    if not dst.is_dir():
        raise ConversionError(f"--output {dst} is a file; choose a directory path for --output")
    if not is_own_output(dst):
        raise ConversionError(f"output directory {dst} already exists and is not a gqa-convert output, so it is "
                              f"never replaced, even with --force; choose another --output")
    if not force:
        raise ConversionError(f"output directory {dst} already exists (an earlier gqa-convert output); pass --force "
                              f"to replace it or choose another --output")


def _partial_name(dst: Path, pid: int | str) -> str:
    """The temporary sibling's name: the host is in it, so a run on another machine sharing the filesystem never
    takes a live conversion's directory for a dead one."""
    return partial_name(dst.name, f"{socket.gethostname()}-{pid}")


def _remove_stale_partials(dst: Path) -> None:
    """Remove the temporary siblings that conversions killed on this host (SIGKILL, power loss) left behind."""
    prefix = _partial_name(dst, "")
    for partial in dst.parent.glob(glob.escape(prefix) + "*"):
        pid = partial.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_directory(dst: Path, force: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dst` when the block finishes without an exception."""
    check_output_free(dst, force, source)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dst)
    tmp = dst.parent / _partial_name(dst, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with sigterm_interrupts():
            yield tmp
            check_output_free(dst, force, source)  # again: the user may have put files there during a long run
            if dst.exists():
                old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
                os.rename(dst, old)
                os.rename(tmp, dst)
                shutil.rmtree(old)
            else:
                os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def listing(entries: Iterable[Path], shown: int = 3) -> str:
    """A few of a folder's entries for a message: `a, b/, c and 4 more` (folders marked with a slash)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
