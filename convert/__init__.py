"""Checkpoint surgery: turn an MHA or GQA checkpoint into one with fewer key/value heads.

    from gqa_toolkit.convert import convert_checkpoint
    convert_checkpoint("llama-7b", method="mean", groups=8)
"""

from .api import convert_checkpoint
from .errors import ConversionError
from .families.rope import RopeLayout
from .methods import alignment, fitting  # noqa: F401  registers the layer methods `aligned` and `fit`
from .methods.layer import AttentionWeights, align_layer, convert_layer, permute_layer
from .methods.registry import (
                               LAYER_METHODS,
                               METHODS,
                               MethodContext,
                               all_method_names,
                               register_layer_method,
                               register_method,
)

__all__ = ["convert_checkpoint", "ConversionError", "METHODS", "LAYER_METHODS", "MethodContext", "register_method",
           "register_layer_method", "all_method_names", "AttentionWeights", "RopeLayout", "convert_layer",
           "align_layer", "permute_layer"]
