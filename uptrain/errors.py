"""The exception the uptrain stage raises for user errors; the command prints it as a one-line message."""

from collections.abc import Iterator
from contextlib import contextmanager

from gqa_toolkit.errors import ToolkitError, first_line  # noqa: F401  (first_line: the stage's quoting helper)


class UptrainError(ToolkitError):
    """A problem with the user's input (recipe, model, data, output dir) or a run that cannot go on."""


@contextmanager
def uptrain_errors() -> Iterator[None]:
    """The kernel's readers (gqa_toolkit.audio) raise the toolkit's base error itself: raised on as this stage's."""
    try:
        yield
    except ToolkitError as e:
        if type(e) is not ToolkitError:
            raise
        raise UptrainError(str(e)) from None
