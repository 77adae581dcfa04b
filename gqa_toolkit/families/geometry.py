"""Attention geometry read from a model config: layers, query heads, KV heads, head size, init scale.

The toolkit's one definition of its words for heads, which every other module points to:

    H  query heads.  G  key/value (KV) heads: the `--groups` of every command, `groups` in the code, the
    `num_key_value_heads` of a config. Query head h reads KV head h // (H/G), so H/G query heads share each one
    (contiguous groups, transformers' repeat_kv).

        MHA  G = H   q0 q1 q2 q3 q4 q5 q6 q7      GQA  G = 2   q0 q1 q2 q3 | q4 q5 q6 q7      MQA  G = 1
             kv0 kv1 kv2 kv3 kv4 kv5 kv6 kv7                  kv0         | kv1                all read kv0

    A GQA source with G0 KV heads converts to any G dividing G0; the KV cache shrinks by G0/G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConversionError
from ..model_dir import short_repr
from .config import TransformersConfig
from .spec import ArchitectureSpec, all_specs, spec_for

if TYPE_CHECKING:
    from .config import ConfigReader


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    heads: int  # H, query heads
    kv_heads: int  # G0, the source's KV heads
    head_dim: int  # hd
    init_std: float  # the family's initializer_range, for the `random` method


def read_geometry(config: ConfigReader, spec: ArchitectureSpec, kind: str | None = None) -> Geometry:
    """`config` answers as the family's transformers config would (see families/config.py); `kind` one of the spec's
    attention kinds (default: its first)."""
    kind = kind or next(iter(spec.attention))
    for attr, wanted in spec.requires.items():
        found = config.get(attr)
        if found != wanted:
            raise ConversionError(f"{config.model_type} conversion needs {attr}={wanted!r} in config.json, found "
                                  f"{short_repr(found)}: this checkpoint's attention layout is not one the family's "
                                  f"config can give fewer KV heads")
    heads = _count(config, spec.attention[kind].heads_attr)
    kv_attr = spec.kv_heads_attr_of(kind)
    # A family converted through the toolkit's modeling code is MHA unless the source already runs that code: the
    # stock modeling ignores any KV-head count its config.json happens to hold.
    counts_kv_heads = spec.modeling is None or config.model_type == spec.modeling.model_type
    # None (a missing or null count) means what transformers makes of it: one KV head per query head, and a head
    # size of hidden_size / heads
    kv_heads = (_count(config, kv_attr, optional=True) if kv_attr and counts_kv_heads else None) or heads
    if kv_heads > heads or heads % kv_heads:
        raise ConversionError(f"config.json has {kv_attr}={kv_heads} for {heads} query heads "
                              f"({spec.attention[kind].heads_attr}); KV heads must divide the query heads "
                              f"(one of: {', '.join(map(str, divisors(heads)))}): fix config.json or the checkpoint")
    head_dim = _count(config, "head_dim", optional=True) or _count(config, "hidden_size") // heads
    init_std = config.get("initializer_range")
    if init_std is not None and (isinstance(init_std, bool) or not isinstance(init_std, (int, float))):
        raise ConversionError(f"config.json has initializer_range={short_repr(init_std)}; expected a number")
    return Geometry(
        num_layers=_count(config, spec.attention[kind].layers_attr),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        init_std=0.02 if init_std is None else float(init_std),
    )


def _count(config: ConfigReader, attr: str, optional: bool = False) -> int | None:
    value = config.get(attr)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json has {attr}={short_repr(value)}; expected a positive whole number")
    return value


def read_geometries(config: ConfigReader, spec: ArchitectureSpec, scope: str | None = None) -> dict[str, Geometry]:
    """Attention kind -> geometry, for the kinds that `scope` converts."""
    return {kind: read_geometry(config, spec, kind) for kind in spec.kinds(scope)}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_groups(groups: int, geometry: Geometry, spec: ArchitectureSpec, setting: str = "--groups",
                 whose: str = "the checkpoint's") -> None:
    """G must divide the current KV head count and not exceed it; some families can express only some G. The one
    check of G against a model, for the converter and the ablation alike (`setting`: how the caller names G)."""
    G0 = geometry.kv_heads
    valid = [g for g in divisors(G0) if spec.only_groups is None or g in spec.only_groups]
    if groups > G0:
        raise ConversionError(f"{setting} {groups} is more than {whose} {G0} KV heads; conversion can only "
                              f"share heads, choose one of: {', '.join(map(str, valid))}")
    if groups < 1 or G0 % groups:
        raise ConversionError(f"{setting} {groups} does not divide {whose} {G0} KV heads; choose one of: "
                              f"{', '.join(map(str, valid))}")
    if groups not in valid:
        raise ConversionError(f"this family's config can only express {', '.join(map(str, valid))} KV heads, "
                              f"not {setting} {groups}; choose one of: {', '.join(map(str, valid))}")


def model_geometry(config, kind: str | None = None) -> Geometry:
    """The geometry of a loaded transformers config (a model's `.config`), read through its family's spec."""
    spec = spec_for(config.model_type)
    return read_geometry(TransformersConfig(config, spec.config.keys), spec, kind)


def context_length(config) -> int | None:
    """The positions a loaded transformers config's model attends over, from its family's context attribute; None
    when the family has no limit (T5's relative positions) or the toolkit does not know the family."""
    spec = all_specs().get(config.model_type)
    value = getattr(config, spec.context_attr, None) if spec is not None and spec.context_attr else None
    return value if isinstance(value, int) else None


def check_context(config, tokens: int, setting: str, error: type[Exception], decode_steps: int = 0) -> None:
    """Refuse `tokens` positions (plus `decode_steps` generated after them) past the model's context, naming the
    setting that chose them."""
    limit = context_length(config)
    if limit is None or tokens + decode_steps <= limit:
        return
    given = f"{setting} {tokens}" if setting.startswith("--") else f"{setting}={tokens}"  # an option, a recipe key
    if decode_steps >= limit:
        raise error(f"{decode_steps} decode steps alone are past the model's context of {limit} tokens; take at most "
                    f"{limit - 1} decode steps (and a context of at most {limit} minus them)")
    if decode_steps:
        raise error(f"{given} plus {decode_steps} decode steps is past the model's context of {limit} "
                    f"tokens; lower {setting} to at most {limit - decode_steps} or take fewer decode steps")
    raise error(f"{given} is longer than the model's context of {limit} tokens; set {setting} to at most "
                f"{limit}")
