"""How every gqa-* command reports a problem: one `PROG: error: ...` line on stderr and exit status 2, for click's
usage errors (a bad option value, a missing argument, an unknown option), the stages' errors and disk faults alike;
the library's warnings as `PROG: warning: ...` lines; Ctrl-C or SIGTERM as one line saying what was kept, and
status 130 or 143.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import wraps
from typing import NoReturn

import click

from .interrupts import interrupted_status, sigterm_interrupts

from .errors import Interrupted, ToolkitError, first_line
from . import disk

HELP = {"help_option_names": ["-h", "--help"]}


class OneLineUsageError(click.UsageError):
    """A usage error shown like the stages' errors: `PROG: error: message; see 'PROG CMD --help'`."""

    def show(self, file=None) -> None:
        command = self.ctx.command_path if self.ctx else ""
        message = self.format_message()
        joint = " " if message.endswith("?") else "; "  # "Did you mean 'perplexity'? see ..."
        click.echo(f"{command.split(' ')[0]}: error: {message}{joint}see '{command} --help'", err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, (OneLineUsageError, click.exceptions.NoArgsIsHelpError)):  # the latter shows the help
        return exc
    return OneLineUsageError(exc.format_message().rstrip("."), exc.ctx)


class _OneLineUsage:
    """Parses the command's options (and a group's subcommand's); click's usage errors come out as one line."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None


class Command(_OneLineUsage, click.Command):
    pass


class Group(_OneLineUsage, click.Group):
    pass


def fail(prog: str, message) -> NoReturn:
    """Print one error line and exit 2. Output that a full disk under `> out.json` cannot take is dropped, so that
    Python does not add its own lines about it at exit."""
    try:
        sys.stdout.flush()
    except OSError:
        _silence_stdout()
    click.echo(f"{prog}: error: {_bounded(str(message))}", err=True)
    sys.exit(2)


def _bounded(message: str, width: int = 1000) -> str:
    """Each line of a message cut to `width` characters: a value quoted whole (a path, a config value) never floods
    the terminal."""
    return "\n".join(line if len(line) <= width else line[: width - 3] + "..." for line in message.splitlines())


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test runner's buffer)
        pass


def emit(prog: str, text: str) -> None:
    """Print a command's result; a full disk under `> out.json` becomes one error line that says so."""
    try:
        click.echo(text)
    except OSError as exc:
        fail(prog, disk.write_fault_message("the standard output", exc, "another file to redirect it to"))


def user_errors(prog: str, interrupted: str, out_of_memory: str | None = None):
    """Decorate a command: the stages' errors and disk faults become one line on stderr and exit status 2, and so
    does running out of memory when the command says what to change (`out_of_memory`); Ctrl-C prints
    `PROG: interrupted; <interrupted>` and exits 130 (143 after SIGTERM)."""

    def decorate(fn):
        @wraps(fn)
        def run(*args, **kwargs):
            try:
                with sigterm_interrupts():
                    return fn(*args, **kwargs)
            except Interrupted as exc:  # the run said what it kept
                click.echo(f"{prog}: interrupted; {exc}", err=True)
                sys.exit(interrupted_status())
            except ToolkitError as exc:
                fail(prog, exc)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted; {interrupted}", err=True)
                sys.exit(interrupted_status())
            except Exception as exc:  # a disk fault in a library's write (torch, safetensors) that no stage named
                if out_of_memory is not None and _out_of_memory(exc):
                    fail(prog, f"out of memory ({first_line(exc)}); {out_of_memory}")
                if disk.fault_errno(exc) not in disk.WRITE_ONLY_FAULTS:
                    raise
                fail(prog, disk.write_fault_message(None, exc))

        return run

    return decorate


def _out_of_memory(exc: Exception) -> bool:
    """MemoryError, torch's OutOfMemoryError on an accelerator, or its CPU allocator's refusal."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        (isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("not enough memory", "can't allocate memory")))


def print_warnings(prog: str, logger: str) -> None:
    """The library's warnings (links skipped, a damaged cache rebuilt, ...) as `PROG: warning: ...` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
    log = logging.getLogger(logger)
    log.handlers, log.propagate = [handler], False
