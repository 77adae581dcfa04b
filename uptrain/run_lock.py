"""One run per output.dir: the main process holds the folder's lock (gqa_toolkit/lock.py) for the whole run, so a
second gqa-uptrain on the same output.dir is refused in one line instead of interleaving its metrics and
checkpoints with the first's. The other processes of a multi-process run take no lock: when the main process is
refused, the launcher (torchrun, accelerate launch) stops them with it."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from gqa_toolkit.lock import exclusive

from .errors import UptrainError


def _main_process() -> bool:
    """Rank 0 as the launchers say it (before accelerate has set up its state), or a single process."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")).strip()
    return not rank.isdigit() or int(rank) == 0  # a rank that is no number is accelerate's to refuse


def run_lock(out: Path):
    refused = f"another gqa-uptrain is writing output.dir {out} now; wait for it to finish (then rerun to resume) "\
              "or choose another output.dir"
    return _held(out, refused) if _main_process() else nullcontext()


@contextmanager
def _held(out: Path, refused: str) -> Iterator[None]:
    """The lock of `out` held for the block; a parent folder made for it is removed after, when left empty."""
    created = not out.parent.exists()
    lock = exclusive(out, refused, UptrainError)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    except OSError:  # an unwritable place: the run's first write reports it, naming output.dir
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
        if created:
            try:
                out.parent.rmdir()  # only when the run left it empty (it was refused before writing)
            except OSError:
                pass
