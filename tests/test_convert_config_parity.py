"""The config attributes read from config.json through the specs' data equal what AutoConfig gives, for every family.

Each family's config is built with its stock transformers config class (the toolkit's own for gqa_*) and saved;
then variants of its config.json drop or null every attribute the spec declares a default for, hold an attribute
under each of the keys the spec lists for it, and move RoPE parameters to the top level as older transformers
wrote them. For every variant and every --attention scope, the geometry (or the refusal) and the RoPE layout read
from config.json must equal those read through AutoConfig.
"""

import json
from functools import partial

import pytest
from families import FAMILIES, NO_NATIVE_FAMILIES, family_config
from transformers import AutoConfig

import gqa_toolkit.families.modeling  # noqa: F401  registers the gqa_* config classes with AutoConfig
from gqa_toolkit.convert.errors import ConversionError
from gqa_toolkit.families.config import SourceConfig, TransformersConfig
from gqa_toolkit.families.geometry import read_geometries
from gqa_toolkit.families.loading import load_transformers_config
from gqa_toolkit.families.rope import rope_layout
from gqa_toolkit.families.spec import spec_for

CASES = {f.model_type: (f.model_type, family_config(f)) for f in FAMILIES}
CASES.update({f.model_type: (f.model_type, f.config) for f in NO_NATIVE_FAMILIES})
# What gqa-convert writes for the families served by the toolkit's modeling code: already GQA
def _grouped(model_type: str) -> dict:
    """Every KV-head count of a converted config at 2 (each attention kind's own attribute, as the spec names it)."""
    spec = spec_for(model_type)
    return {spec.kv_heads_attr_of(kind): 2 for kind in spec.attention}


CASES.update({f"gqa_{f.model_type}": (f"gqa_{f.model_type}", {**f.config, **_grouped(f"gqa_{f.model_type}")})
              for f in NO_NATIVE_FAMILIES})
# A decoder depth that differs from the encoder's, so that reading the wrong one shows
CASES["t5 with a shallower decoder"] = ("t5", {**CASES["t5"][1], "num_decoder_layers": 1})


def _refuse():
    raise AssertionError("config.json and the spec's data should answer without transformers")


def reading(reader, spec) -> dict:
    """Per --attention scope: the geometries and RoPE layout, or the refusal's message."""
    out = {}
    for scope in spec.scopes:
        try:
            geometries = read_geometries(reader, spec, scope)
            rope = None
            if spec.block is not None and reader.model_type in spec.block.model_types:
                rope = rope_layout(spec.block.rope, reader, geometries[spec.block.attention].head_dim)
        except ConversionError as exc:  # e.g. GPT-J's default rotary_dim (64) wider than a tiny head
            out[scope] = str(exc)
            continue
        out[scope] = (geometries, rope)
    return out


def variants(raw: dict, spec) -> dict[str, tuple[dict, bool]]:
    """name -> (config.json, whether the spec's data must answer it alone)."""
    found = {"as saved": (raw, True)}
    for attr in spec.config.defaults_for(raw["model_type"]):
        keys = spec.config.keys.get(attr, (attr,))
        if not any(key in raw for key in keys):
            continue
        found[f"without {attr}"] = ({k: v for k, v in raw.items() if k not in keys}, True)
        found[f"{attr} null"] = ({**raw, **dict.fromkeys(keys)}, False)
    for attr, keys in spec.config.keys.items():
        held = [k for k in keys if k in raw]
        for i, key in enumerate(keys[:-1]):  # a value under an earlier key wins over the later keys
            if key in raw and any(k in raw for k in keys[i + 1:]):
                found[f"without {key}"] = ({k: v for k, v in raw.items() if k != key}, True)
                found[f"{key} null"] = ({**raw, key: None}, True)
            elif key not in raw and held:
                found[f"{attr} as {key}"] = ({**{k: v for k, v in raw.items() if k not in keys}, key: raw[held[0]]},
                                             True)
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # flat, not per layer type
        older = {k: v for k, v in raw.items() if k != "rope_parameters"}
        older.update({k: v for k, v in rope.items() if k != "rope_type"})
        found["RoPE parameters at the top level"] = (older, True)
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_config_json_reads_as_autoconfig_does(case, tmp_path):
    model_type, config = CASES[case]
    spec = spec_for(model_type)
    AutoConfig.for_model(model_type, **config).save_pretrained(tmp_path / "saved")
    raw = json.loads((tmp_path / "saved" / "config.json").read_text())
    mismatches = []
    for name, (config_json, answers_alone) in variants(raw, spec).items():
        model_dir = tmp_path / name.replace(" ", "-")
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(config_json))
        try:
            expected = reading(load_transformers_config(model_dir), spec)
        except ConversionError as exc:  # transformers refuses this config.json
            expected = dict.fromkeys(spec.scopes, str(exc))
        load = _refuse if answers_alone else partial(load_transformers_config, model_dir)
        got = reading(SourceConfig(config_json, spec.config, load=load), spec)
        if got != expected:
            mismatches.append(f"{name}: config.json gives {got}, AutoConfig {expected}")
    assert not mismatches, "\n".join(mismatches)


def test_an_attribute_the_data_cannot_answer_comes_from_autoconfig(llama_dir):
    raw = json.loads((llama_dir / "config.json").read_text())
    del raw["num_attention_heads"]  # no default declared: LlamaConfig's own (32) must win
    loads = []

    def load():
        loads.append(1)
        return TransformersConfig(AutoConfig.for_model(**raw))

    reader = SourceConfig(raw, spec_for("llama").config, load=load)
    assert reader.get("num_attention_heads") == 32 and reader.get("hidden_size") == raw["hidden_size"]
    assert reader.get("num_attention_heads") == 32 and loads == [1]


def test_every_family_the_tests_build_is_covered():
    assert {f.model_type for f in FAMILIES} | {f.model_type for f in NO_NATIVE_FAMILIES} <= set(CASES)
