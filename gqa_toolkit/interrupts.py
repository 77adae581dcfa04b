"""The toolkit's one SIGTERM handler: a scheduler's kill (or `timeout`) stops the work as Ctrl-C does, so that
what is half-written is removed and the command says what it kept, then exits 143 as the shell reports SIGTERM
(130 after Ctrl-C). Nested uses (a command around an atomic output directory) share the outer handler."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

_terminated = False  # the interruption was SIGTERM, not Ctrl-C


def _interrupt(signum, frame):
    global _terminated
    _terminated = True
    raise KeyboardInterrupt(f"signal {signum}")


def interrupted_status() -> int:
    """143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + (signal.SIGTERM if _terminated else signal.SIGINT)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    global _terminated
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is _interrupt:  # an outer use already handles it
            yield
            return
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    _terminated = False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
