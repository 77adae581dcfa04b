"""The one exception type the convert stage raises for bad input; the CLI prints it as a single line."""


class ConversionError(Exception):
    """A problem with the user's input, stated with what was found and how to fix it."""
