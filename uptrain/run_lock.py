"""One run per output.dir: the main process holds the folder's lock (convert/io/lock.py) for the whole run, so a
second gqa-uptrain on the same output.dir is refused in one line instead of interleaving its metrics and
checkpoints with the first's. Every process of a multi-process run learns the answer, so none waits for a run
that was refused."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from gqa_toolkit.convert.io.lock import exclusive

from .errors import UptrainError


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    from accelerate import PartialState

    state = PartialState()
    refused = f"another gqa-uptrain is writing output.dir {out} now; wait for it to finish (then rerun to resume) "\
              "or choose another output.dir"
    with ExitStack() as held:
        problem = None
        if state.is_main_process:
            try:
                held.enter_context(_held(out, refused))
            except UptrainError as exc:
                problem = str(exc)
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            answer = [problem]
            broadcast_object_list(answer)
            problem = answer[0]
        if problem is not None:
            raise UptrainError(problem)
        yield


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
