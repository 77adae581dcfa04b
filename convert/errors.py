"""The convert stage's exceptions (the toolkit's error base lives in the kernel, gqa_toolkit.errors); every command
prints them as a single line."""

from gqa_toolkit.errors import ToolkitError, first_line  # noqa: F401  (re-exported: the stages import them from here)


class Interrupted(ToolkitError):
    """Ctrl-C or SIGTERM stopped a run; the message says what was kept and how to go on."""


class ConversionError(ToolkitError):
    """A problem with the checkpoint or the conversion options."""
