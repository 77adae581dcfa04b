"""Architecture specs: per-family data saying where K/V heads live on disk and how the config counts them.

A spec is a JSON file in specs/, validated against `SpecFile`; an unknown key is an error at any depth, so a
misspelt field can never be silently ignored. It holds one entry per attention kind (`AttentionEntry`: its module,
the config attributes counting its layers and heads, q/k/v/o or a fused qkv, biases, extras such as k_norm, RoPE)
and the model types the layer methods cover. `"extends": "<file stem>"` puts a parent file under it: objects merge
key by key at any depth, a list or a value replaces the parent's. Files named `_*.json` are only extended. The
converter reads the resolved `ArchitectureSpec`: the K/V tensors (`tensors`) and the layer methods' projections
(`blocks`) derived from the entries. Adding a family is adding a spec (plus its parity test).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from typing import Annotated, ClassVar, Literal, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from ..errors import ConversionError

# How a per-KV-head tensor is laid out on disk:
#   rows     leading dim is G*hd (projection weights [G*hd, d], biases [G*hd], olmo2's k_norm [G*hd])
#   heads    leading dim is G (cohere's k_norm [G, hd])
#   stacked  one tensor per head, the key holds {head} (stablelm's k_layernorm.norms.{head}.weight [hd])
#   fused    q, k and v in one tensor; `layout` names the fused layout (see gqa_toolkit/families/fused.py)
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
    transposed: bool = False  # the head rows are the last axis (Conv1D weights are stored [in, out])
    attention: str = "self"  # which of the spec's attention kinds this tensor belongs to

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


class AttentionKind(_Strict):
    """One kind of attention in a model (T5 has three: encoder, decoder self-attention and cross-attention)."""

    layers_attr: str = "num_hidden_layers"  # config attribute counting the layers that hold it
    heads_attr: str = "num_attention_heads"  # config attribute counting its query heads (BART's differ by stack)
    module: str = "layers.{layer}.self_attn"  # the attention module's on-disk name (with {layer}): what trains as
    # `trainable: attention`
    kv_heads_attr: str | None = None  # config attribute counting its KV heads; default the spec's kv_heads_attr
    cached: bool = True  # its K/V go into the KV cache (an encoder's self-attention keeps none)


class AudioInput(_Strict):
    """An encoder that takes log-mel features instead of token ids (whisper): `mel_bins_attr` features per frame
    and a fixed window of `positions_attr` encoder positions, `frames_per_position` frames each (whisper's
    stride-2 convolution). The text tasks of gqa-uptrain and gqa-eval refuse such a model; gqa-eval speed encodes
    a window of random features."""

    mel_bins_attr: str
    positions_attr: str
    frames_per_position: int
    decoder_positions_attr: str  # the decoder's own positions (whisper: 448), which decoding cannot pass


class Modeling(_Strict):
    """GQA modeling code shipped by the toolkit for a family whose transformers modeling has none.

    `file` (in gqa_toolkit/families/modeling/) is copied with the attention core it imports into every output directory, which
    gets `model_type`, `architectures` and `auto_map` in its config.json, so that `from_pretrained(out,
    trust_remote_code=True)` needs no toolkit.
    """

    CORE: ClassVar[str] = "gqa_attention.py"

    file: str
    model_type: str  # the GQA model_type; a source of this type is already GQA, any other is MHA
    architectures: tuple[str, ...]
    auto_map: dict[str, str]  # Auto class -> "module.Class"

    @model_validator(mode="after")
    def _names_the_file(self) -> "Modeling":
        module = self.file.removesuffix(".py")
        bad = [v for v in self.auto_map.values() if v.rsplit(".", 1)[0] != module]
        if not self.file.endswith(".py") or bad:
            raise ValueError(f"auto_map entries must name classes in {self.file}, found {bad}")
        return self

    @property
    def files(self) -> tuple[str, ...]:
        """The files written into an output directory: the shared core, then the family's own."""
        return self.CORE, self.file

    @property
    def auto_class(self) -> str:
        """The Auto class with the LM head that the modeling registers (whisper's AutoModelForSpeechSeq2Seq)."""
        return next(k for k in self.auto_map if k != "AutoConfig")


class NativeTarget(_Strict):
    """A stock transformers family that holds this family's output exactly at some G (gpt2 at G=1 is gpt_bigcode
    with `multi_query`): written instead of the toolkit's modeling code, so the output loads with no remote code.
    Used for the per-tensor methods when the source has every `requires` value."""

    groups: tuple[int, ...]
    model_type: str
    architectures: tuple[str, ...]
    requires: dict[str, bool | int | str | None] = {}  # source config values the mapping relies on
    set_config: dict[str, bool | int | str] = {}  # config.json values the target needs
    copy_config: tuple[str, ...] = ()  # attributes written out explicitly: the target's defaults differ
    transpose: tuple[str, ...] = ()  # weights (with {layer}) that the source stores [in, out], the target [out, in]


class Rope(_Strict):
    """How the family rotates queries and keys by position, for the methods that rotate K heads (see
    gqa_toolkit/families/rope.py). `rotate_half` pairs dimension i with i + rotary_dims/2 (HF llama); the first `rotary_dims`
    = int(head_dim * factor) dimensions rotate, the factor read from the first of `factor_attrs` the config has
    (dotted: a key of a dict attribute), or the count itself from the first of `dims_attrs` (GPT-J's `rotary_dim`).
    `interleaved` pairs 2i with 2i + 1 (GPT-J). `none`: no rotary embedding, every key dimension is free."""

    style: Literal["rotate_half", "interleaved", "none"]
    factor_attrs: tuple[str, ...] = ()
    dims_attrs: tuple[str, ...] = ()


class AttentionBlock(_Strict):
    """One layer's attention projections, for the methods that change Q and O with K and V (aligned, fit,
    similarity grouping). Each entry lists on-disk module names (with {layer}, without .weight/.bias); the first
    one present is used. The layer methods run only on `model_types`, the families their exactness tests cover,
    and refuse a checkpoint holding any `refuse_if_present` tensor (per-head q/k norms do not commute with
    rotations)."""

    q: tuple[str, ...] = ()
    k: tuple[str, ...] = ()
    v: tuple[str, ...] = ()
    qkv: tuple[str, ...] = ()  # instead of q, k, v: one fused module, split and re-fused by `fused_layout`
    fused_layout: str | None = None  # a layout of gqa_toolkit/families/fused.py
    transposed: bool = False  # weights stored `[in, out]` (GPT-2's Conv1D), not nn.Linear's `[out, in]`
    o: tuple[str, ...]
    rope: Rope
    model_types: tuple[str, ...]
    refuse_if_present: tuple[str, ...] = ()
    attention: str = "self"
    keys_from_encoder: bool = False  # cross-attention: K and V read the encoder's states, Q the decoder's
    # a bias on the logits that belongs to each query head's position (t5's relative bias, bloom's ALiBi slopes):
    # permuting heads would change the function, so similarity grouping is refused
    position_bias_per_head: bool = False

    @model_validator(mode="after")
    def _separate_or_fused(self) -> "AttentionBlock":
        if bool(self.qkv) == bool(self.q and self.k and self.v) or bool(self.qkv) != bool(self.fused_layout):
            raise ValueError("a block names either q, k and v, or qkv with its fused_layout")
        return self

    @property
    def inputs(self) -> tuple[str, ...]:
        """The module(s) whose input is the attention input: q's, or the fused projection's."""
        return self.q or self.qkv


ConfigValue = bool | int | float | str | None


class ConfigSchema(_Strict):
    """How the family's config.json holds the attributes conversion reads, so that reading them needs no
    transformers import: its config classes' attribute_map and defaults, as data (see gqa_toolkit/families/config.py).
    An attribute that config.json lacks and that has no default here is read through AutoConfig instead; a test
    compares every reading with AutoConfig's for every family the tests build."""

    # attribute -> the config.json keys that hold it, the first non-null one wins (default: the attribute's name).
    # Empty: no key does, the class computes it (falcon's head_dim).
    keys: dict[str, tuple[str, ...]] = {}
    # attribute -> the class's value when config.json holds none of its keys; null: the class leaves it None or
    # has no such attribute, and config.json's null means the same. Per model type where a class differs.
    defaults: dict[str, ConfigValue] = {}
    model_type_defaults: dict[str, dict[str, ConfigValue]] = {}

    def defaults_for(self, model_type: str) -> dict[str, ConfigValue]:
        return {**self.defaults, **self.model_type_defaults.get(model_type, {})}


class _FamilyFacts(_Strict):
    """What a family's spec file and its resolved `ArchitectureSpec` both hold, beside the attention kinds."""

    model_types: tuple[str, ...]
    # Config attribute that counts KV heads, read from config.json (see `config`) and rewritten to G. None: the
    # family's config has no trustworthy count (gpt_bigcode saves a stale one) and `requires` pins the source to
    # H KV heads.
    kv_heads_attr: str | None = None
    # The named sets of attention kinds that `--attention` chooses from (default: the first).
    scopes: dict[str, tuple[str, ...]] = {"all": ("self",)}
    modeling: Modeling | None = None
    native: NativeTarget | None = None
    requires: dict[str, bool | int | str] = {}  # source config values the spec relies on
    only_groups: tuple[int, ...] | None = None  # the G values the family's config can express
    set_config: dict[str, bool | int | str] = {}  # extra config.json values written on output
    config: ConfigSchema = ConfigSchema()
    # config attribute holding the positions the model can attend over; None: no limit (T5's relative buckets)
    context_attr: str | None = "max_position_embeddings"
    audio: AudioInput | None = None  # the encoder takes audio features (whisper), not token ids


class ArchitectureSpec(_FamilyFacts):
    """A family's spec resolved for the converter: its attention kinds, every K/V tensor (`tensors`) and, for the
    layer methods, every kind's projections (`blocks`), derived from the spec file's attention entries."""

    attention: dict[str, AttentionKind] = {"self": AttentionKind()}  # attention kinds by name
    tensors: tuple[KVTensor, ...]
    # where Q and O live, one block per attention kind the layer methods convert (t5: decoder self-, cross- and
    # encoder attention); none: they refuse the family
    blocks: tuple[AttentionBlock, ...] = ()

    @model_validator(mode="after")
    def _has_required_k_and_v(self) -> "ArchitectureSpec":
        unknown = {t.attention for t in self.tensors} | {k for ks in self.scopes.values() for k in ks}
        unknown |= {b.attention for b in self.blocks}
        unknown -= set(self.attention)
        if unknown:
            raise ValueError(f"attention kinds {sorted(unknown)} are not declared in 'attention'")
        for kind in self.attention:
            parts = {t.part for t in self.tensors if t.required and t.attention == kind}
            if not ({"k", "v"} <= parts or "qkv" in parts):
                raise ValueError(f"attention {kind!r} needs required K and V tensors (or a required fused qkv "
                                 f"tensor)")
        if not self.scopes:
            raise ValueError("'scopes' needs at least one entry")
        kinds = [b.attention for b in self.blocks]
        if len(set(kinds)) < len(kinds):
            raise ValueError(f"blocks name the attention kinds {kinds}: one block per kind")
        if self.blocks and set(kinds) != set(self.attention):
            raise ValueError(f"blocks cover the attention kinds {kinds} of {sorted(self.attention)}: a spec with "
                             "blocks has one for every kind, so no kind is left to mean-pooling")
        outside = [t.key for t in self.tensors if not t.key.startswith(self.attention[t.attention].module + ".")]
        if outside:
            raise ValueError(f"tensors {outside} lie outside their attention kind's module")
        if unknown := set(self.config.model_type_defaults) - set(self.model_types):
            raise ValueError(f"config.model_type_defaults names model types {sorted(unknown)} that are not in "
                             f"'model_types'")
        if self.modeling is not None and self.modeling.model_type not in self.model_types:
            raise ValueError(f"model_types must include the modeling's {self.modeling.model_type!r}, so a "
                             f"converted checkpoint converts again")
        return self

    @property
    def default_scope(self) -> str:
        return next(iter(self.scopes))

    def kinds(self, scope: str | None) -> dict[str, AttentionKind]:
        """The attention kinds that `--attention scope` converts (None: the default scope)."""
        scope = scope or self.default_scope
        if scope not in self.scopes:
            raise ConversionError(f"--attention {scope!r} is not one this family has; choose one of: "
                                  f"{', '.join(self.scopes)}")
        return {k: self.attention[k] for k in self.scopes[scope]}

    @property
    def encoder_decoder(self) -> bool:
        """Some block's keys read an encoder's states (cross-attention)."""
        return any(b.keys_from_encoder for b in self.blocks)

    @property
    def block(self) -> AttentionBlock | None:
        """The first block: a decoder-only family's only one."""
        return self.blocks[0] if self.blocks else None

    def kv_heads_attr_of(self, kind: str) -> str | None:
        return self.attention[kind].kv_heads_attr or self.kv_heads_attr

    def attention_patterns(self, kinds: Iterable[str] | None = None) -> list[re.Pattern[str]]:
        """Regexes matching the parameters of every attention module the spec names (or those of `kinds`),
        whatever the model prefix."""
        chosen = self.attention if kinds is None else {k: self.attention[k] for k in kinds}
        return [re.compile(key_pattern(kind.module).pattern.removesuffix("$") + r"\.")
                for kind in chosen.values()]


# One module name, or several of which the first present is used (llama's o_proj, phi's dense).
Names = Annotated[tuple[str, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v)]


class ExtraTensor(_Strict):
    """A per-KV-head tensor beside the K/V projections, converted with them (olmo2's and cohere's k_norm,
    stablelm's per-head k_layernorm)."""

    key: str  # relative to the kind's module, with {head} when stacked ("k_norm.weight")
    part: Literal["k", "v"]
    layout: Literal["rows", "heads", "stacked"] = "rows"
    init: Init = "normal"
    required: bool = False  # every layer must have it


class AttentionEntry(_Strict):
    """One attention kind in a spec file, everything said once: where it lives and how the config counts it, its
    projections (module names relative to `module`), the tensors converted with K and V, and what the layer
    methods need (RoPE, the norms that refuse them, a per-head position bias, keys read from the encoder)."""

    module: str = "layers.{layer}.self_attn"
    layers_attr: str = "num_hidden_layers"
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = None
    cached: bool = True
    q: Names = ()
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # instead of k and v (and q): one fused projection
    fused_layout: str | None = None  # with qkv: its layout in gqa_toolkit/families/fused.py
    fused_output_layout: str | None = None  # with qkv: the layout written, where it differs (gpt_bigcode)
    transposed: bool = False  # weights stored `[in, out]` (GPT-2's Conv1D), not nn.Linear's `[out, in]`
    o: Names = ()
    bias: tuple[Literal["k", "v", "qkv"], ...] = ()  # projections with an (optional, zero-initialised) bias
    extras: tuple[ExtraTensor, ...] = ()
    rope: Rope | None = None
    refuse_if_present: tuple[str, ...] = ()  # tensors (relative to module) the layer methods refuse
    keys_from_encoder: bool = False
    position_bias_per_head: bool = False

    # what only the layer methods read: a kind of a spec without layer_methods leaves it out
    LAYER_FIELDS: ClassVar[tuple[str, ...]] = ("q", "o", "rope", "refuse_if_present", "keys_from_encoder",
                                               "position_bias_per_head")

    @model_validator(mode="after")
    def _separate_or_fused(self) -> "AttentionEntry":
        if bool(self.qkv) == bool(self.k or self.v) or bool(self.k) != bool(self.v):
            raise ValueError("an attention kind names either k and v, or a fused qkv")
        if bool(self.qkv) != bool(self.fused_layout) or (self.fused_output_layout and not self.qkv):
            raise ValueError("fused_layout (and fused_output_layout) go with qkv, and qkv needs fused_layout")
        if self.qkv and self.q:
            raise ValueError("a fused qkv holds q: name no separate q")
        if unknown := set(self.bias) - {p for p in ("k", "v", "qkv") if getattr(self, p)}:
            raise ValueError(f"bias names {sorted(unknown)}, which this kind does not have")
        return self

    def full(self, name: str) -> str:
        return f"{self.module}.{name}"

    def kind(self) -> AttentionKind:
        return AttentionKind(layers_attr=self.layers_attr, heads_attr=self.heads_attr, module=self.module,
                             kv_heads_attr=self.kv_heads_attr, cached=self.cached)

    def tensors(self, attention: str) -> list[KVTensor]:
        """Its K/V tensors in this order: the weights, then the biases, then the extras."""
        fused = {"layout": "fused", "fused_layout": self.fused_layout,
                 "fused_output_layout": self.fused_output_layout} if self.qkv else {}
        parts = ("qkv",) if self.qkv else ("k", "v")
        made = [KVTensor(key=self.full(f"{getattr(self, p)}.{suffix}"), part=p, transposed=self.transposed,
                         attention=attention, **fused, **extra)
                for suffix, extra, chosen in (("weight", {"required": True}, parts),
                                              ("bias", {"init": "zeros"}, [p for p in parts if p in self.bias]))
                for p in chosen]
        return made + [KVTensor(**{**e.model_dump(), "key": self.full(e.key)}, attention=attention)
                       for e in self.extras]

    def block(self, attention: str, model_types: tuple[str, ...]) -> AttentionBlock:
        names = {p: (self.full(getattr(self, p)),) for p in ("k", "v", "qkv") if getattr(self, p)}
        return AttentionBlock(**names, q=tuple(map(self.full, self.q)), o=tuple(map(self.full, self.o)),
                              fused_layout=self.fused_layout, transposed=self.transposed, rope=self.rope,
                              model_types=model_types, refuse_if_present=tuple(map(self.full, self.refuse_if_present)),
                              attention=attention, keys_from_encoder=self.keys_from_encoder,
                              position_bias_per_head=self.position_bias_per_head)


class SpecFile(_FamilyFacts):
    """A spec file as written (after `extends`, see `load_specs`): the family facts, one entry per attention kind,
    and the model types the layer methods cover (their exactness tests); none: the layer methods refuse it."""

    attention: dict[str, AttentionEntry]
    layer_methods: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _layer_methods_covered(self) -> "SpecFile":
        if unknown := set(self.layer_methods) - set(self.model_types):
            raise ValueError(f"layer_methods names model types {sorted(unknown)} that are not in 'model_types'")
        for name, entry in self.attention.items():
            if self.layer_methods and not ((entry.q or entry.qkv) and entry.o and entry.rope):
                raise ValueError(f"attention {name!r} needs q (or qkv), o and rope: the layer_methods convert it")
            if not self.layer_methods and (unused := [f for f in entry.LAYER_FIELDS if f in entry.model_fields_set]):
                raise ValueError(f"attention {name!r} sets {unused}, which only the layer methods read: list the "
                                 f"model types they cover in 'layer_methods', or leave these out")
        return self

    def resolve(self) -> ArchitectureSpec:
        facts = {name: getattr(self, name) for name in _FamilyFacts.model_fields}
        return ArchitectureSpec(
            **facts, attention={name: entry.kind() for name, entry in self.attention.items()},
            tensors=tuple(t for name, entry in self.attention.items() for t in entry.tensors(name)),
            blocks=tuple(entry.block(name, self.layer_methods) for name, entry in self.attention.items())
            if self.layer_methods else ())


def key_pattern(template: str) -> re.Pattern[str]:
    """A regex for an on-disk key template: {layer} and {head} become named groups, and any model prefix
    ("model.", "language_model.model.", ...) is captured as `prefix`. Use with `.match`."""
    body = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{head\}", r"(?P<head>\d+)")
    return re.compile(rf"^(?P<prefix>(?:.+\.)?){body}$")


def _spec_files() -> dict[str, str]:
    folder = resources.files(__package__) / "specs"
    return {p.name: p.read_text() for p in folder.iterdir() if p.name.endswith(".json")}


def _merged(parent: dict, child: dict) -> dict:
    """`child` over `parent`: objects merge key by key, at any depth; a list or a value replaces the parent's."""
    out = dict(parent)
    for key, value in child.items():
        both_objects = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_objects else value
    return out


def _raw_spec(file_name: str, files: Mapping[str, str], chain: tuple[str, ...] = ()) -> dict:
    """A spec file's JSON with its `extends` chain merged in, parent first."""
    raw = json.loads(files[file_name])
    parent = raw.pop("extends", None) if isinstance(raw, dict) else None
    if parent is None:
        return raw
    parent_file = f"{parent}.json" if isinstance(parent, str) else None
    if parent_file not in files:
        raise ValueError(f"extends {parent!r}, which is not a spec file in this folder (one of: "
                         f"{', '.join(sorted(n.removesuffix('.json') for n in files))})")
    chain = (*chain, file_name)
    if parent_file in chain:
        raise ValueError(f"extends in a circle: {' -> '.join((*chain, parent_file))}")
    return _merged(_raw_spec(parent_file, files, chain), raw)


def load_specs(files: Mapping[str, str]) -> dict[str, ArchitectureSpec]:
    """model_type -> spec, from spec files (file name -> JSON text). A file whose name starts with "_" holds what
    several specs extend and is no spec itself (_bart_layout.json)."""
    by_type: dict[str, ArchitectureSpec] = {}
    for file_name in sorted(n for n in files if not n.startswith("_")):
        try:
            spec = SpecFile.model_validate(_raw_spec(file_name, files)).resolve()
        except (ValidationError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise RuntimeError(f"architecture spec {file_name} is invalid: {exc}") from exc
        for model_type in spec.model_types:
            if model_type in by_type:
                raise RuntimeError(f"model_type {model_type!r} appears in two architecture specs")
            by_type[model_type] = spec
    return by_type


@lru_cache(maxsize=None)
def all_specs() -> dict[str, ArchitectureSpec]:
    """model_type -> spec, for every spec file shipped in this folder."""
    return load_specs(_spec_files())


def supported_model_types() -> list[str]:
    return sorted(all_specs())


@lru_cache(maxsize=None)
def refused_model_types() -> dict[str, str]:
    """model_type -> why the toolkit does not convert it (refused.json)."""
    return json.loads((resources.files(__package__) / "refused.json").read_text())


def lm_auto_class_name(model_type: str, encoder_decoder: bool) -> str:
    """The transformers Auto class with the LM head for a model of this type, stock or converted: the one the
    family's modeling registers (whisper's AutoModelForSpeechSeq2Seq), else seq2seq for encoder-decoders and
    causal for the rest (also for families the toolkit does not know)."""
    spec = all_specs().get(model_type)
    if spec is not None and spec.modeling is not None:
        return spec.modeling.auto_class
    return "AutoModelForSeq2SeqLM" if encoder_decoder else "AutoModelForCausalLM"


def audio_input(model_type: str) -> AudioInput | None:
    spec = all_specs().get(model_type)
    return spec.audio if spec is not None else None


def spec_for(model_type: str) -> ArchitectureSpec:
    specs = all_specs()
    if model_type in specs:
        return specs[model_type]
    if model_type in refused_model_types():
        raise ConversionError(f"model_type {model_type!r} {refused_model_types()[model_type]}; supported model "
                              f"types: {', '.join(supported_model_types())}")
    raise ConversionError(
        f"unsupported model_type {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )
