"""Calibration runs the source one block at a time: the same moments as a full forward of the stock model, with at
most one block's parameters off the meta device at any moment."""

import pytest
import torch
from conftest import load_model
from families import FAMILIES

from gqa_toolkit.convert.families.spec import spec_for
from gqa_toolkit.convert.methods import block_stream as blockwise

LAYER_METHOD_FAMILIES = [f for f in FAMILIES if f.model_type in spec_for("llama").block.model_types]


def _tokens():
    return torch.randint(0, 128, (10, 16), generator=torch.Generator().manual_seed(0))


def _q_projections(model):
    return [layer.self_attn.q_proj for layer in model.model.layers]


def _reference_moments(model_dir, tokens, attention_inputs=_q_projections):
    """E[[x; 1][x; 1]^T] of every attention input (q_proj's, by default), from hooks on the stock model run
    whole: written independently."""
    model = load_model(model_dir)
    inputs = {}
    hooks = [module.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, module in enumerate(attention_inputs(model))]
    with torch.no_grad():
        for start in range(0, len(tokens), 8):
            model(input_ids=tokens[start:start + 8])
    for hook in hooks:
        hook.remove()
    result = {}
    for i, xs in inputs.items():
        x = torch.cat(xs).double()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, d + 1)
        result[i] = xa.T @ xa
    return result


@pytest.mark.parametrize("family", LAYER_METHOD_FAMILIES, ids=lambda f: f.model_type)
def test_blockwise_moments_equal_a_full_forward(family, family_dirs):
    src = family_dirs[family.model_type]
    tokens = _tokens()
    ours = dict(blockwise.BlockStream(src, spec_for(family.model_type).block, tokens))
    reference = _reference_moments(src, tokens)
    assert sorted(ours) == sorted(reference)
    for i in reference:
        assert ours[i].count == len(tokens) * tokens.shape[1]
        torch.testing.assert_close(ours[i].total, reference[i], rtol=1e-9, atol=1e-9)


def test_streamed_moments_run_only_as_far_as_asked(family_dirs):
    stream = blockwise.BlockStream(family_dirs["llama"], spec_for("llama").block, _tokens())
    streamed = blockwise.StreamedMoments(stream)
    expected = dict(blockwise.BlockStream(family_dirs["llama"], spec_for("llama").block, _tokens()))
    torch.testing.assert_close(streamed[0].total, expected[0].total, rtol=0, atol=0)
    assert stream.calls, "layer 1 has not run yet"
    torch.testing.assert_close(streamed[1].total, expected[1].total, rtol=0, atol=0)
    with pytest.raises(KeyError):
        streamed[1]  # handed out once, then freed


def test_one_block_at_a_time(family_dirs, monkeypatch):
    src = family_dirs["llama"]
    live_per_call = []
    original = blockwise._first_output

    def counting(out):
        model_params = counting.model.named_parameters()
        live_per_call.append(sorted({n.split(".")[2] for n, p in model_params
                                     if n.startswith("model.layers.") and p.device.type != "meta"}))
        return original(out)

    real_materialise = blockwise._materialise

    def remember_model(model, names, weights, device, dtype):
        counting.model = model
        return real_materialise(model, names, weights, device, dtype)

    monkeypatch.setattr(blockwise, "_materialise", remember_model)
    monkeypatch.setattr(blockwise, "_first_output", counting)
    dict(blockwise.BlockStream(src, spec_for("llama").block, _tokens()))
    assert live_per_call and all(len(live) == 1 for live in live_per_call), live_per_call
    assert [live[0] for live in live_per_call][::2] == ["0", "1"]  # 10 sequences: two batches per block


def test_sequential_mode_calibrates_each_layer_on_the_converted_model(family_dirs, tmp_path, monkeypatch):
    """In sequential mode layer i's moments are those of the converted checkpoint itself (loaded by stock
    transformers, K/V with G heads), not of the source: the layers before it are the converted ones."""
    import gqa_toolkit.convert.api as api
    from gqa_toolkit.convert import convert_checkpoint

    seen = {}

    class Recording(blockwise.StreamedMoments):
        def __getitem__(self, layer):
            seen[layer] = super().__getitem__(layer)
            return seen[layer]

    monkeypatch.setattr(api, "StreamedMoments", Recording)
    src, tokens = family_dirs["llama"], _tokens()
    out = convert_checkpoint(src, tmp_path / "out", method="fit", groups=2, calibration=tokens,
                             calibration_mode="sequential", progress=False)
    converted = _reference_moments(out, tokens)
    source = _reference_moments(src, tokens)
    torch.testing.assert_close(seen[0].total, source[0], rtol=1e-9, atol=1e-9)  # nothing before layer 0
    torch.testing.assert_close(seen[1].total, converted[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(converted[1], source[1], rtol=1e-3)
    record = __import__("json").loads((out / "config.json").read_text())["gqa_conversion"]
    assert record["calibration_mode"] == "sequential"


def test_each_block_gets_its_own_mask(tmp_path):
    """gemma2 alternates sliding-window and full attention: with calibration longer than the window, each block
    must be replayed with the mask the model gives it, not the first block's."""
    from conftest import save_tiny_model
    from families import BASE

    src = save_tiny_model(tmp_path / "gemma2", "gemma2", {**BASE, "head_dim": 16, "num_hidden_layers": 3,
                                                          "sliding_window": 4})
    tokens = _tokens()
    ours = dict(blockwise.BlockStream(src, spec_for("gemma2").block, tokens))
    reference = _reference_moments(src, tokens)
    for i in reference:
        torch.testing.assert_close(ours[i].total, reference[i], rtol=1e-9, atol=1e-9)


ATTENTION_INPUTS = {  # where the attention input of each family outside `model.layers` is, from the stock layout
    "gpt_neox": lambda m: [layer.attention.query_key_value for layer in m.gpt_neox.layers],
    "bloom": lambda m: [block.self_attention.query_key_value for block in m.transformer.h],
    "gptj": lambda m: [block.attn.q_proj for block in m.transformer.h],
    "phi3": lambda m: [layer.self_attn.qkv_proj for layer in m.model.layers],
    "falcon": lambda m: [layer.self_attention.query_key_value for layer in m.transformer.h],
    "gpt2": lambda m: [block.attn.c_attn for block in m.transformer.h],
}


@pytest.mark.parametrize("model_type", ATTENTION_INPUTS)
def test_blockwise_moments_of_other_layouts(model_type, no_native_dirs, family_dirs):
    src, tokens = {**family_dirs, **no_native_dirs}[model_type], _tokens()
    ours = dict(blockwise.BlockStream(src, spec_for(model_type).block, tokens))
    reference = _reference_moments(src, tokens, ATTENTION_INPUTS[model_type])
    assert sorted(ours) == sorted(reference)
    for i in reference:
        torch.testing.assert_close(ours[i].total, reference[i], rtol=1e-9, atol=1e-9)
