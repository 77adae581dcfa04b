"""What uptrain and eval ask a family's spec (its attention modules, its context length, its geometry) agrees with
the stock transformers model of every family, read here without the specs."""

import pytest
import torch
import transformers
from families import FAMILIES, FAMILY_IDS, NO_NATIVE_FAMILIES, NO_NATIVE_IDS, family_config

from gqa_toolkit.convert.errors import ConversionError
from gqa_toolkit.families.geometry import context_length, model_geometry
from gqa_toolkit.families.spec import spec_for
from gqa_toolkit.uptrain.trainable import select_trainable

CASES = [(f.model_type, family_config(f), "AutoModelForCausalLM") for f in FAMILIES] + \
        [(f.model_type, f.config, f.auto) for f in NO_NATIVE_FAMILIES]


def _model(model_type, config, auto):
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(transformers.AutoConfig.for_model(model_type, **config))


def _attention_by_class(model) -> set[str]:
    """Parameters of the modules transformers itself calls attention (LlamaAttention, T5Attention, ...), not the
    sublayer wrappers around them (T5LayerSelfAttention holds a layer norm too)."""
    names = set()
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith("Attention") and "Layer" not in kind:
            names.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
    return names


@pytest.mark.parametrize("model_type, config, auto", CASES, ids=FAMILY_IDS + NO_NATIVE_IDS)
def test_trainable_attention_is_what_transformers_calls_attention(model_type, config, auto):
    model = _model(model_type, config, auto)
    assert set(select_trainable(model, "attention")) == _attention_by_class(model)
    assert all(p.requires_grad == (n in _attention_by_class(model)) for n, p in model.named_parameters())


@pytest.mark.parametrize("model_type, config, auto", CASES, ids=FAMILY_IDS + NO_NATIVE_IDS)
def test_context_length_and_geometry_come_from_the_spec(model_type, config, auto):
    stock = transformers.AutoConfig.for_model(model_type, **config)
    # no limit the toolkit checks: t5 (relative positions), bloom (ALiBi), whisper (a fixed 30 s audio window)
    expected = None if model_type in ("t5", "bloom", "whisper") else stock.max_position_embeddings
    assert context_length(stock) == expected
    geometry = model_geometry(stock, next(iter(spec_for(model_type).attention)))
    assert geometry.heads == stock.num_attention_heads
    # test-side knowledge: falcon counts its KV heads as num_kv_heads, the stock no-native families have MHA
    native = {} if model_type in NO_NATIVE_IDS else config
    assert geometry.kv_heads == (native.get("num_kv_heads") or native.get("num_key_value_heads") or geometry.heads)


def test_refused_families_say_why():
    with pytest.raises(ConversionError, match="encoder: it keeps no KV cache"):
        spec_for("bert")
