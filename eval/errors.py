"""The exception the eval stage raises for bad input; the command prints it as one line."""

from gqa_toolkit.errors import ToolkitError


class EvalError(ToolkitError):
    """A problem with the user's input, stated with what was found and how to fix it."""
