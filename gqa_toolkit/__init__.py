"""gqa-toolkit: convert multi-head-attention checkpoints to grouped-query attention, uptrain and evaluate them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gqa-toolkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
