"""The exception the eval stage raises for bad input; the CLI prints it as one line."""


class EvalError(Exception):
    """A problem with the user's input, stated with what was found and how to fix it."""
