"""The one exception the uptrain stage raises for user errors; the CLI prints it as a one-line message."""


class UptrainError(Exception):
    """A problem with the user's input (recipe, model, data, output dir) or a run that cannot go on.

    The message names the problem and the fix; the CLI prints it without a traceback and exits non-zero.
    """


def first_line(error: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` (cut at `limit` characters), to quote a library's exception inside a
    one-line error."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
