"""The toolkit's one error base, shared by every stage (each raises its own subclass) and by the kernel's own
readers (gqa_toolkit.audio), so that any command catches them the same way."""


class ToolkitError(Exception):
    """A problem with the user's input, or a run that cannot go on, stated with what was found and how to fix it.
    Each stage raises its own subclass (ConversionError, UptrainError, EvalError); the commands catch this base."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` (cut at `limit` characters), to quote a library's exception inside a
    one-line error."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


class ConversionError(ToolkitError):
    """A problem with the checkpoint or the conversion options (raised by the kernel's family and checkpoint readers
    too, since every stage reads checkpoints through them)."""


class Interrupted(ToolkitError):
    """Ctrl-C or SIGTERM stopped a run; the message says what was kept and how to go on."""
