"""Moved to `gqa_toolkit.convert.methods.layer` (or import the names from `gqa_toolkit.convert`); this alias stays
for one release so that scripts written against it keep working."""

from .methods.layer import AttentionWeights, InputMoments, RopeLayout, align_layer, convert_layer, permute_layer

__all__ = ["AttentionWeights", "InputMoments", "RopeLayout", "align_layer", "convert_layer", "permute_layer"]
