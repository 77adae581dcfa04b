"""The convert stage's exceptions, which live in the kernel (gqa_toolkit.errors) because the kernel's checkpoint and
family readers raise them too; every command prints them as a single line."""

from gqa_toolkit.errors import ConversionError, Interrupted, ToolkitError, first_line  # noqa: F401  (re-exported)
