"""Checkpoint surgery: turn an MHA or GQA checkpoint into one with fewer key/value heads.

    from gqa_toolkit.convert import convert_checkpoint
    convert_checkpoint("llama-7b", method="mean", groups=8)
"""

from . import modeling  # registers the toolkit's GQA t5, gpt2, gpt_neox and opt classes with the Auto classes
from .api import convert_checkpoint
from .errors import ConversionError
from .methods import METHODS, MethodContext, register_method

__all__ = ["convert_checkpoint", "ConversionError", "METHODS", "MethodContext", "register_method"]
