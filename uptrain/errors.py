"""The exception the uptrain stage raises for user errors; the command prints it as a one-line message."""

from gqa_toolkit.convert.errors import ToolkitError, first_line  # noqa: F401  (first_line: the stage's quoting helper)


class UptrainError(ToolkitError):
    """A problem with the user's input (recipe, model, data, output dir) or a run that cannot go on."""
