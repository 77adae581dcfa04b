"""Checkpoint surgery: turn an MHA or GQA checkpoint into one with fewer key/value heads.

    from gqa_toolkit.convert import convert_checkpoint
    convert_checkpoint("llama-7b", method="mean", groups=8)

Names are imported on first use, so that the commands' --help answers without importing torch.
"""

import importlib

from gqa_toolkit import moved

moved.install()  # the modules that moved into the kernel answer at their old paths too

_EXPORTS = {  # name -> module (relative to this package)
    "convert_checkpoint": ".api", "convert": ".api", "describe_conversion": ".api", "ConversionResult": ".api",
    "ConversionOptions": ".options", "ConversionError": ".errors", "ToolkitError": ".errors",
    "AttentionWeights": ".methods.layer", "convert_layer": ".methods.layer", "align_layer": ".methods.layer",
    "permute_layer": ".methods.layer", "RopeLayout": "gqa_toolkit.families.rope",
    "MethodContext": ".methods.registry", "register_method": ".methods.registry",
    "register_layer_method": ".methods.registry", "all_method_names": ".methods.registry",
}
_REGISTRIES = {"METHODS": "per_head_methods", "LAYER_METHODS": "layer_methods"}  # filled with the built-ins

__all__ = [*_EXPORTS, *_REGISTRIES]


def __getattr__(name: str):
    if name in _REGISTRIES:
        return getattr(importlib.import_module(".methods.registry", __name__), _REGISTRIES[name])()
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
