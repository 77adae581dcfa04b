"""The one exception the uptrain stage raises for user errors; the CLI prints it as a one-line message."""


class UptrainError(Exception):
    """A problem with the user's input (recipe, model, data, output dir) or a run that cannot go on.

    The message names the problem and the fix; the CLI prints it without a traceback and exits non-zero.
    """
