"""Spec files (v2): unknown keys refused at any depth, `extends` merges a parent under its child, and the K/V
tensors and layer-method blocks the converter reads are derived from one entry per attention kind."""

import json

import pytest

from gqa_toolkit.families.spec import all_specs, load_specs, spec_for

BASE = {"model_types": ["base"], "kv_heads_attr": "num_key_value_heads", "layer_methods": ["base"],
        "attention": {"self": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "bias": ["k", "v"],
                               "rope": {"style": "rotate_half"}}},
        "config": {"keys": {"hidden_size": ["d_model"]}, "defaults": {"head_dim": None}}}


def _load(**files):
    return load_specs({f"{name}.json": json.dumps(raw) for name, raw in files.items()})


def test_an_entry_derives_the_tensors_and_the_block():
    spec = _load(base=BASE)["base"]
    assert [(t.key, t.part, t.required, t.init) for t in spec.tensors] == [
        ("layers.{layer}.self_attn.k_proj.weight", "k", True, "normal"),
        ("layers.{layer}.self_attn.v_proj.weight", "v", True, "normal"),
        ("layers.{layer}.self_attn.k_proj.bias", "k", False, "zeros"),
        ("layers.{layer}.self_attn.v_proj.bias", "v", False, "zeros")]
    (block,) = spec.blocks
    assert (block.q, block.k, block.o, block.model_types) == (
        ("layers.{layer}.self_attn.q_proj",), ("layers.{layer}.self_attn.k_proj",),
        ("layers.{layer}.self_attn.o_proj",), ("base",))


@pytest.mark.parametrize("where", ["top", "attention", "rope"])
def test_an_unknown_key_is_refused_at_any_depth(where):
    raw = json.loads(json.dumps(BASE))
    {"top": raw, "attention": raw["attention"]["self"], "rope": raw["attention"]["self"]["rope"]}[where]["k_porj"] = 1
    with pytest.raises(RuntimeError, match=r"(?s)base\.json is invalid.*k_porj.*Extra inputs are not permitted"):
        _load(base=raw)


def test_a_child_overrides_one_field_and_inherits_the_rest():
    child = {"extends": "base", "model_types": ["child"], "layer_methods": ["child"],
             "attention": {"self": {"bias": ["v"]}}, "config": {"defaults": {"num_key_value_heads": None}}}
    specs = _load(base=BASE, child=child)
    base, derived = specs["base"], specs["child"]
    assert [t.key.rsplit(".", 2)[-2:] for t in derived.tensors] == [["k_proj", "weight"], ["v_proj", "weight"],
                                                                    ["v_proj", "bias"]]
    # objects merge key by key: the parent's keys and defaults stay beside the child's
    assert derived.config.keys == base.config.keys
    assert derived.config.defaults == {"head_dim": None, "num_key_value_heads": None}
    assert derived.blocks[0].rope == base.blocks[0].rope and derived.blocks[0].model_types == ("child",)
    assert derived.model_dump(exclude={"model_types", "tensors", "blocks", "config"}) == \
        base.model_dump(exclude={"model_types", "tensors", "blocks", "config"})


def test_an_unknown_or_circular_parent_is_refused_in_one_line():
    with pytest.raises(RuntimeError, match="child.json is invalid: extends 'bsae', which is not a spec file") as exc:
        _load(base=BASE, child={"extends": "bsae", "model_types": ["child"]})
    assert "\n" not in str(exc.value) and "one of: base, child" in str(exc.value)
    with pytest.raises(RuntimeError, match=r"extends in a circle: a\.json -> b\.json -> a\.json"):
        _load(a={**BASE, "extends": "b"}, b={"extends": "a"})


def test_layer_method_facts_go_with_layer_methods():
    without = {**BASE, "layer_methods": []}
    with pytest.raises(RuntimeError, match=r"sets \['q', 'o', 'rope'\], which only the layer methods read"):
        _load(base=without)
    no_rope = json.loads(json.dumps(BASE))
    del no_rope["attention"]["self"]["rope"]
    with pytest.raises(RuntimeError, match="needs q \\(or qkv\\), o and rope"):
        _load(base=no_rope)
    with pytest.raises(RuntimeError, match="either k and v, or a fused qkv"):
        _load(base={**BASE, "attention": {"self": {**BASE["attention"]["self"], "qkv": "c_attn"}}})


def test_shipped_variants_share_their_parent_and_fragments_are_no_specs():
    bart, mbart, whisper = spec_for("bart"), spec_for("mbart"), spec_for("whisper")
    assert mbart.tensors == bart.tensors and mbart.attention == bart.attention
    assert [b.model_dump(exclude={"model_types"}) for b in mbart.blocks] == \
        [b.model_dump(exclude={"model_types"}) for b in bart.blocks]
    assert mbart.modeling.architectures == ("GQAMBartForConditionalGeneration",)
    assert [b.q for b in whisper.blocks] == [b.q for b in bart.blocks]
    assert not any(t.key.endswith("k_proj.bias") for t in whisper.tensors)  # whisper's K has no bias
    assert "num_key_value_heads" not in whisper.config.defaults  # objects merge, but only what a file says
    assert all(not t.startswith("_") for t in all_specs())
