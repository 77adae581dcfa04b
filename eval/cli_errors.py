"""How gqa-eval reports a problem: one `gqa-eval: error: ...` line on stderr and exit status 2, for click's usage
errors (a bad option value, a missing argument, an unknown option), the stages' input errors and disk faults alike.
"""

from __future__ import annotations

import os
import sys
from functools import wraps
from typing import NoReturn

import click


class OneLineUsageError(click.UsageError):
    """A usage error shown like the stages' errors: `gqa-eval: error: message; see 'gqa-eval CMD --help'`."""

    def show(self, file=None) -> None:
        command = self.ctx.command_path if self.ctx else "gqa-eval"
        click.echo(f"gqa-eval: error: {self.format_message()}; see '{command} --help'", err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, (OneLineUsageError, click.exceptions.NoArgsIsHelpError)):  # the latter shows the help
        return exc
    return OneLineUsageError(exc.format_message().rstrip("."), exc.ctx)


class OneLineErrorsGroup(click.Group):
    """Parses the group's options and its subcommand's; click's usage errors come out as one line."""

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


def fail(message) -> NoReturn:
    """Print one error line and exit 2. Output that a full disk under `> out.json` cannot take is dropped, so that
    Python does not add its own lines about it at exit."""
    try:
        sys.stdout.flush()
    except OSError:
        _silence_stdout()
    click.echo(f"gqa-eval: error: {message}", err=True)
    sys.exit(2)


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test runner's buffer)
        pass


def emit(text: str) -> None:
    """Print a command's result; a full disk under `> out.json` becomes one error line that says so."""
    from .outputs import write_fault

    try:
        click.echo(text)
    except OSError as exc:
        raise write_fault("the standard output", exc, "another file to redirect it to") from None


def user_errors(fn):
    """Turn the stages' input errors and disk faults into one line on stderr and exit status 2."""

    @wraps(fn)
    def run(*args, **kwargs):
        from gqa_toolkit.convert.errors import ConversionError
        from gqa_toolkit.uptrain.errors import UptrainError

        from .errors import EvalError
        from .outputs import WRITE_ONLY_FAULTS, fault_errno, write_fault

        try:
            return fn(*args, **kwargs)
        except (EvalError, UptrainError, ConversionError) as exc:
            fail(exc)
        except KeyboardInterrupt:
            click.echo("gqa-eval: interrupted; rerun the same command to continue", err=True)
            sys.exit(130)
        except Exception as exc:  # a disk fault in a library's write (torch, safetensors) that no stage named
            if fault_errno(exc) not in WRITE_ONLY_FAULTS:
                raise
            fail(write_fault(None, exc))

    return run
