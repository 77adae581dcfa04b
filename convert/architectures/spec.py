"""Architecture specs: per-family data saying where K/V heads live on disk and how the config counts them.

A spec is a JSON file in this folder. Loading validates it against `ArchitectureSpec`; an unknown key is an error,
so a misspelt field can never be silently ignored. Adding a family is adding a spec (plus its parity test).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import ConversionError

# Families whose transformers config accepts `num_key_value_heads` but whose modeling code ignores it.
NO_NATIVE_GQA = ("t5", "gpt2", "gpt_neox", "opt", "bloom", "gptj", "bart", "bert")

# How a per-KV-head tensor is laid out on disk:
#   rows     leading dim is G*hd (projection weights [G*hd, d], biases [G*hd], olmo2's k_norm [G*hd])
#   heads    leading dim is G (cohere's k_norm [G, hd])
#   stacked  one tensor per head, the key holds {head} (stablelm's k_layernorm.norms.{head}.weight [hd])
#   fused    q, k and v in one tensor; `layout` names the fused layout (see convert/layouts.py)
TensorLayout = Literal["rows", "heads", "stacked", "fused"]
# What the `random` method draws for this tensor: the model's own initialiser for that kind of parameter.
Init = Literal["normal", "zeros", "ones"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KVTensor(_Strict):
    key: str  # on-disk name relative to the model prefix, with {layer} (and {head} for stacked)
    part: Literal["k", "v", "qkv"]
    layout: TensorLayout = "rows"
    fused_layout: str | None = None  # for layout "fused": source layout name
    fused_output_layout: str | None = None  # for layout "fused": output layout name when it differs
    init: Init = "normal"
    required: bool = False  # every layer must have it

    @model_validator(mode="after")
    def _consistent(self) -> "KVTensor":
        if "{layer}" not in self.key:
            raise ValueError(f"key {self.key!r} has no {{layer}} placeholder")
        if (self.layout == "stacked") != ("{head}" in self.key):
            raise ValueError(f"key {self.key!r}: {{head}} appears exactly when layout is 'stacked'")
        if (self.layout == "fused") != (self.part == "qkv"):
            raise ValueError(f"key {self.key!r}: part 'qkv' goes with layout 'fused' and only with it")
        if (self.layout == "fused") != (self.fused_layout is not None):
            raise ValueError(f"key {self.key!r}: fused_layout is set exactly when layout is 'fused'")
        return self


class ArchitectureSpec(_Strict):
    model_types: tuple[str, ...]
    # Config attribute that counts KV heads, read through AutoConfig and rewritten to G. None: the family's config
    # has no trustworthy count (gpt_bigcode saves a stale one) and `requires` pins the source to H KV heads.
    kv_heads_attr: str | None = None
    requires: dict[str, bool | int | str] = {}  # source config values the spec relies on
    only_groups: tuple[int, ...] | None = None  # the G values the family's config can express
    set_config: dict[str, bool | int | str] = {}  # extra config.json values written on output
    tensors: tuple[KVTensor, ...]

    @model_validator(mode="after")
    def _has_required_k_and_v(self) -> "ArchitectureSpec":
        parts = {t.part for t in self.tensors if t.required}
        if not ({"k", "v"} <= parts or "qkv" in parts):
            raise ValueError("a spec needs required K and V tensors (or a required fused qkv tensor)")
        return self


def _spec_files() -> list[tuple[str, str]]:
    folder = resources.files(__package__)
    return sorted((p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".json"))


@lru_cache(maxsize=None)
def all_specs() -> dict[str, ArchitectureSpec]:
    """model_type -> spec, for every spec file shipped in this folder."""
    by_type: dict[str, ArchitectureSpec] = {}
    for file_name, text in _spec_files():
        try:
            spec = ArchitectureSpec.model_validate(json.loads(text))
        except (ValidationError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"architecture spec {file_name} is invalid: {exc}") from exc
        for model_type in spec.model_types:
            if model_type in by_type:
                raise RuntimeError(f"model_type {model_type!r} appears in two architecture specs")
            by_type[model_type] = spec
    return by_type


def supported_model_types() -> list[str]:
    return sorted(all_specs())


def spec_for(model_type: str) -> ArchitectureSpec:
    specs = all_specs()
    if model_type in specs:
        return specs[model_type]
    if model_type in NO_NATIVE_GQA:
        raise ConversionError(
            f"model_type {model_type!r} has no grouped-query attention in transformers (its config ignores "
            f"num_key_value_heads), so a converted checkpoint would silently run as MHA; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    raise ConversionError(
        f"unsupported model_type {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )
