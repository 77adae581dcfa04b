"""An output directory that appears whole or not at all.

Everything is written into a hidden temporary sibling, renamed into place at the end. An exception, Ctrl-C or
SIGTERM leaves no partial output, and a later run removes what SIGKILL left. The source is never the output, above
it or below it; an existing directory is replaced only with `force=True`, and only if it is the toolkit's output.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from gqa_toolkit.interrupts import sigterm_interrupts

from .errors import ConversionError
from .disk import partial_name
from .lock import exclusive
from .records import CONVERSION_KEY, UPTRAINING_KEY

# What a gqa-uptrain run folder holds beside its model; gqa-convert writes none of these
RUN_FILES = ("uptrain_recipe.yaml", "metrics.jsonl", "checkpoints")


def is_own_output(path: Path) -> bool:
    """Whether `path` is a directory that gqa-convert (or gqa-uptrain after it) wrote: its config.json carries the
    conversion record."""
    return CONVERSION_KEY in _config(path)


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}
    return config if isinstance(config, dict) else {}


def foreign_entries(path: Path) -> list[str]:
    """What in an earlier gqa-convert output gqa-convert did not write: a gqa-uptrain run's files, folders, and,
    while the recorded source is there to compare with, files that are neither the source's nor the converter's
    own. `--force` replaces the folder only when this is empty."""
    config = _config(path)
    if UPTRAINING_KEY in config:
        return ["config.json (an uptrained model)"]
    entries = sorted(path.iterdir())
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if p.name in RUN_FILES or not p.is_file()]
    record = config.get(CONVERSION_KEY)
    source = Path(record["source"]) if isinstance(record, dict) and isinstance(record.get("source"), str) else None
    if source is not None and source.is_dir():
        own = {p.name for p in source.iterdir()} | {"config.json", "README.md", "model.safetensors.index.json"} | \
            _modeling_files()
        foreign += [p.name for p in entries if p.is_file() and p.name not in own and p.name not in RUN_FILES
                    and not SHARD.fullmatch(p.name)]
    return foreign


SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # the writer's names


def _modeling_files() -> set[str]:
    """The toolkit's modeling files, which outputs of its own families carry."""
    package = resources.files("gqa_toolkit.families.modeling")
    return {p.name for p in package.iterdir() if p.name.endswith(".py")}


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
    check_output_path(dst, "--output", ConversionError)
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
    foreign = foreign_entries(dst)
    if foreign:
        raise ConversionError(f"output directory {dst} holds what gqa-convert did not write ({listing_names(foreign)}"
                              f"), so --force does not replace it; choose another --output")


def check_output_path(dst: Path, setting: str, error: type[Exception]) -> None:
    """Refuse an output path that cannot be made: under a file, or with a name (or its staging sibling's, which is
    longer) or a whole path past what the filesystem takes."""
    existing = next((p for p in dst.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise error(f"{setting} {dst} is under {existing}, which is a file; choose a path under a directory")
    folder = existing if existing is not None else Path("/")
    name_max, path_max = _limit(folder, "PC_NAME_MAX", 255), _limit(folder, "PC_PATH_MAX", 4096)
    staged = max(len(os.fsencode(_partial_name(dst, 2**22))), len(os.fsencode(f".{dst.name}.replaced-{2**22}")))
    if staged > name_max or any(len(os.fsencode(part)) > name_max for part in dst.parts):
        raise error(f"{setting} name {dst.name[:40]}... is too long: with its staging prefix it takes {staged} bytes "
                    f"and this filesystem takes {name_max}; choose a name under {name_max - (staged - len(dst.name))} "
                    f"characters")
    if len(os.fsencode(str(dst))) + staged - len(dst.name) >= path_max:
        raise error(f"{setting} {str(dst)[:40]}... is a path of {len(str(dst))} characters, past this system's limit "
                    f"of {path_max}; choose a shorter path")


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


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
    with exclusive(dst, f"another conversion is writing --output {dst} now; wait for it to finish or choose "
                        f"another --output", ConversionError):
        yield from _staged(dst, force, source)


def _staged(dst: Path, force: bool, source: Path | None) -> Iterator[Path]:
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
    return listing_names([p.name + ("/" if p.is_dir() else "") for p in entries], shown)


def listing_names(names: list[str], shown: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
