"""Moved to `gqa_toolkit.families.rope` (`RopeLayout` is also importable from `gqa_toolkit.convert`); this
alias stays for one release so that scripts written against it keep working."""

from gqa_toolkit.families.rope import KeyMap, RopeLayout, rope_layout

__all__ = ["KeyMap", "RopeLayout", "rope_layout"]
