"""Per-kind G (--kind-groups): an encoder-decoder's decoder self-attention and cross-attention converted to their own
KV-head counts, recorded in config.json so the output loads through the registered classes.

Parity with an independent reference (the stock MHA model with each kind's group means duplicated per head), the
K/V shapes and cache heads each kind was asked for, cached greedy decoding equal to full forwards, a kind kept at
its source's heads left unchanged, the KV figures per kind, and bad per-kind values refused in one line.
"""

import json

import pytest
import torch
import transformers
from conftest import greedy_generate, read_config
from families import NO_NATIVE_FAMILIES
from reference import _separate, _tie_rows_in_place
from safetensors import safe_open
from test_modeling_decoding import Decoder, _key_shapes, _prompt

import gqa_toolkit.families.modeling  # noqa: F401  registers the GQA classes: loads need no remote code
from gqa_toolkit.convert import ConversionError, convert_checkpoint
from gqa_toolkit.convert.api import convert
from gqa_toolkit.convert.options import ConversionOptions
from gqa_toolkit.eval.speed import kv_cache_bytes_per_token

FAMILIES = {f.model_type: f for f in NO_NATIVE_FAMILIES if f.model_type in ("bart", "whisper")}
T5 = next(f for f in NO_NATIVE_FAMILIES if f.model_type == "t5")
HEADS, DECODER_G, CROSS_G = 4, 2, 1
SELF_ATTR = {"bart": "num_key_value_heads", "whisper": "decoder_num_key_value_heads"}


def _load(family, model_dir):
    model, info = getattr(transformers, family.auto).from_pretrained(model_dir, output_loading_info=True,
                                                                     trust_remote_code=False)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _reference(family, src, groups: dict[str, int]):
    """The stock model with K/V heads tied within each kind's groups (group means), in place."""
    model = _load(family, src)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            _separate(layer.self_attn, HEADS, groups["decoder"], "mean", None)
            _separate(layer.encoder_attn, HEADS, groups["cross"], "mean", None)
    return model


def _logits(model, family, ids):
    decoder = Decoder(model, family)
    with torch.no_grad():
        return model(**decoder.encoder(ids, torch.ones_like(ids)), decoder_input_ids=ids[:, :6]).logits


@pytest.fixture(scope="module")
def per_kind(no_native_dirs, tmp_path_factory):
    """family -> (source dir, the conversion's result) at decoder G=2 and cross G=1, each converted once."""
    results = {}

    def get(model_type):
        if model_type not in results:
            src = no_native_dirs[model_type]
            out = tmp_path_factory.mktemp(model_type) / "out"
            results[model_type] = src, convert(src, out, groups=DECODER_G, kind_groups={"cross": CROSS_G},
                                               progress=False)
        return results[model_type]
    return get


@pytest.mark.parametrize("model_type", FAMILIES)
def test_per_kind_g_loads_with_its_shapes_and_equals_reference(model_type, per_kind):
    family = FAMILIES[model_type]
    src, result = per_kind(model_type)
    config = read_config(result.output)
    assert config[SELF_ATTR[model_type]] == DECODER_G and config["cross_num_key_value_heads"] == CROSS_G
    assert config["gqa_conversion"]["kind_groups"] == {"decoder": DECODER_G, "cross": CROSS_G}

    tensors, hd = _tensors(result.output), 64 // HEADS
    for layer in range(2):
        for proj in ("k_proj", "v_proj"):
            assert tensors[f"model.decoder.layers.{layer}.self_attn.{proj}.weight"].shape == (DECODER_G * hd, 64)
            assert tensors[f"model.decoder.layers.{layer}.encoder_attn.{proj}.weight"].shape == (CROSS_G * hd, 64)
            assert tensors[f"model.encoder.layers.{layer}.self_attn.{proj}.weight"].shape == (HEADS * hd, 64)

    converted = _load(family, result.output)
    assert type(converted).__name__.startswith("GQA")
    reference = _reference(family, src, {"decoder": DECODER_G, "cross": CROSS_G})
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(converted, family, ids), _logits(reference, family, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(converted, family, ids), _logits(_load(family, src), family, ids), atol=1e-4)
    inputs = Decoder(converted, family).encoder(ids[:1], torch.ones_like(ids[:1]))
    assert torch.equal(greedy_generate(converted, **inputs, max_new_tokens=6, min_new_tokens=6, pad_token_id=0),
                       greedy_generate(reference, **inputs, max_new_tokens=6, min_new_tokens=6, pad_token_id=0))


@pytest.mark.parametrize("model_type", [*FAMILIES, "t5"])
def test_per_kind_cached_decoding_equals_full_forwards_with_each_kinds_heads(model_type, per_kind):
    family = FAMILIES.get(model_type, T5)
    model = _load(family, per_kind(model_type)[1].output)
    decoder = Decoder(model, family)
    ids, mask = _prompt(model.config.vocab_size, padded=False)
    tokens = torch.full((2, 1), model.config.decoder_start_token_id, dtype=torch.long)
    cache = None
    with torch.no_grad():
        for _ in range(4):
            cached, cache = decoder.step(ids, mask, tokens, cache)
            full = decoder.full(ids, mask, tokens)
            torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
            tokens = torch.cat([tokens, full.argmax(-1, keepdim=True)], 1)
    shapes = _key_shapes(cache)  # decoder self-attention's layers, then cross-attention's
    assert [s[1] for s in shapes] == [DECODER_G] * 2 + [CROSS_G] * 2, shapes


@pytest.mark.parametrize("model_type", FAMILIES)
def test_kv_figures_per_kind_in_record_json_and_card(model_type, per_kind):
    _, result = per_kind(model_type)
    hd, element, layers = 64 // HEADS, 4, 2
    kinds = result.as_json()["kinds"]
    assert kinds["decoder"] == {"kv_heads_before": HEADS, "kv_heads_after": DECODER_G,
                                "kv_cache_bytes_per_token_before": 2 * layers * HEADS * hd * element,
                                "kv_cache_bytes_per_token_after": 2 * layers * DECODER_G * hd * element}
    assert kinds["cross"]["kv_cache_bytes_per_token_after"] == 2 * layers * CROSS_G * hd * element
    assert result.kv_cache_bytes_per_token_after == 2 * layers * (DECODER_G + CROSS_G) * hd * element
    # the figure the loaded model's own cache gives: cross-attention per encoder position, self per decoded token
    assert result.kv_cache_bytes_per_token_after == kv_cache_bytes_per_token(_load(FAMILIES[model_type],
                                                                                   result.output))
    assert read_config(result.output)["gqa_conversion"]["kinds"] == kinds
    card = (result.output / "README.md").read_text()
    assert "| KV heads | decoder 4 -> 2, cross 4 -> 1 |" in card
    assert f"| KV cache per token, cross | {2 * layers * HEADS * hd * element:,} -> " in card


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_kind_kept_at_its_source_heads_is_unchanged(model_type, no_native_dirs, tmp_path):
    src = no_native_dirs[model_type]
    out = convert_checkpoint(src, tmp_path / "out", groups=DECODER_G, kind_groups={"cross": HEADS}, progress=False)
    before, after = _tensors(src), _tensors(out)
    cross = [n for n in after if ".encoder_attn." in n]
    assert cross and all(torch.equal(after[n], before[n]) for n in cross)
    assert after["model.decoder.layers.0.self_attn.k_proj.weight"].shape[0] == DECODER_G * 64 // HEADS
    config = read_config(out)
    assert config["cross_num_key_value_heads"] == HEADS
    _load(FAMILIES[model_type], out)


def test_output_without_a_cross_count_loads_with_the_decoders(no_native_dirs, tmp_path):
    """Outputs written before cross-attention had its own count: cross-attention takes the decoder's."""
    out = convert_checkpoint(no_native_dirs["bart"], tmp_path / "out", groups=DECODER_G, progress=False)
    config = read_config(out)
    del config["cross_num_key_value_heads"]
    (out / "config.json").write_text(json.dumps(config))
    model = _load(FAMILIES["bart"], out)
    assert model.model.decoder.layers[0].encoder_attn.k_proj.weight.shape[0] == DECODER_G * 64 // HEADS


@pytest.mark.parametrize("kind_groups, message", [
    ({"cross": 3}, r"^--kind-groups cross 3 does not divide the checkpoint's cross attention's 4 KV heads; choose "
                   r"one of: 1, 2, 4$"),
    ({"cross": 8}, r"^--kind-groups cross 8 is more than the checkpoint's cross attention's 4 KV heads"),
    ({"encoder": 1}, r"^--kind-groups names 'encoder', which this conversion does not convert .*add --attention "
                     r"all, or drop encoder=$"),
    ({"selfish": 1}, r"^--kind-groups names 'selfish', which is no attention kind; choose among .*cross"),
    ({"cross": 0}, r"^--kind-groups cross=0 must be a positive whole number"),
    ("cross", r"^cannot read --kind-groups 'cross'; write KIND=G pairs"),
    ("cross=x", r"^--kind-groups cross=x must be a positive whole number"),
])
def test_bad_kind_groups_are_refused_in_one_line(kind_groups, message, no_native_dirs, tmp_path):
    with pytest.raises(ConversionError, match=message) as info:
        convert_checkpoint(no_native_dirs["bart"], tmp_path / "out", groups=2, kind_groups=kind_groups,
                           progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_t5_per_kind_g_equals_reference(no_native_dirs, tmp_path):
    family, src = T5, no_native_dirs["t5"]
    out = convert_checkpoint(src, tmp_path / "out", groups=DECODER_G, kind_groups={"cross": CROSS_G}, progress=False)
    config = read_config(out)
    assert config["num_key_value_heads"] == DECODER_G and config["cross_num_key_value_heads"] == CROSS_G
    converted = _load(family, out)
    reference = _load(family, src)
    with torch.no_grad():
        for block in reference.decoder.block:
            for attn, groups in ((block.layer[0].SelfAttention, DECODER_G), (block.layer[1].EncDecAttention, CROSS_G)):
                for proj in (attn.k, attn.v):
                    _tie_rows_in_place(proj.weight, HEADS, groups, "mean")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    logits = [m(input_ids=ids, decoder_input_ids=ids[:, :6]).logits.detach() for m in (converted, reference)]
    torch.testing.assert_close(*logits, rtol=1e-5, atol=1e-5)
    assert converted.decoder.block[0].layer[1].EncDecAttention.k.weight.shape == (CROSS_G * family.head_dim, 64)
    assert converted.decoder.block[0].layer[0].SelfAttention.k.weight.shape == (DECODER_G * family.head_dim, 64)


def test_kinds_sharing_one_config_count_refuse_per_kind_g(no_native_dirs, tmp_path, monkeypatch):
    """A family whose config holds one KV-head count for two kinds cannot give them their own G."""
    from gqa_toolkit.convert import api
    from gqa_toolkit.families.spec import spec_for

    spec = spec_for("t5")
    cross = spec.attention["cross"].model_copy(update={"kv_heads_attr": "num_key_value_heads"})
    shared = spec.model_copy(update={"attention": {**spec.attention, "cross": cross}})
    monkeypatch.setattr(api, "spec_for", lambda model_type: shared)
    with pytest.raises(ConversionError, match=r"^t5's config holds one KV-head count \(num_key_value_heads\) for "
                                              r"its decoder and cross attention, so they cannot have their own G"):
        convert_checkpoint(no_native_dirs["t5"], tmp_path / "out", groups=2, kind_groups={"cross": 1},
                           progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_string_is_parsed_once():
    options = ConversionOptions(groups=4, kind_groups="cross=1, decoder=2")
    assert options.kind_groups == {"cross": 1, "decoder": 2}
    assert options.groups_of("cross") == 1 and options.groups_of("encoder") == 4
    assert options.output_suffix("decoder") == "-gqa4-cross1-decoder2-mean"


@pytest.mark.slow
def test_layer_methods_take_each_units_g(no_native_dirs, tmp_path):
    """fit, calibrated sequentially (each converted unit run back in the source's block at its own G) and refined."""
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    result = convert(no_native_dirs["bart"], tmp_path / "out", groups=DECODER_G, kind_groups={"cross": CROSS_G},
                     method="fit", calibration=ids, calibration_mode="sequential", refine_steps=2, progress=False)
    model = _load(FAMILIES["bart"], result.output)
    for layer in model.model.decoder.layers:
        assert layer.self_attn.k_proj.weight.shape[0] == DECODER_G * 64 // HEADS
        assert layer.encoder_attn.v_proj.weight.shape[0] == CROSS_G * 64 // HEADS
    assert sorted(result.refinement_error) == ["cross.0", "cross.1", "decoder.0", "decoder.1"]
