"""Calibration runs the source one block at a time: the same moments as a full forward of the stock model, with at
most one block's parameters off the meta device at any moment, for decoder-only models and encoder-decoders."""

import pytest
import torch
from conftest import load_model
from families import FAMILIES

from gqa_toolkit.families.spec import spec_for
from gqa_toolkit.convert.methods import block_stream as blockwise

LAYER_METHOD_FAMILIES = [f for f in FAMILIES if f.model_type in spec_for("llama").block.model_types]


def _tokens():
    return torch.randint(0, 128, (10, 16), generator=torch.Generator().manual_seed(0))


def _moments(stream) -> dict:
    """(kind, role, layer) -> moments, over every step of the stream."""
    return {key: moments for step in stream for key, moments in step.moments.items()}


def _streamed(model_dir, model_type, tokens, **kwargs):
    """Layer -> the stream's moments of the query input of the family's first attention kind."""
    block = spec_for(model_type).block
    return {layer: moments for (kind, role, layer), moments in
            _moments(blockwise.BlockStream(model_dir, [block], tokens, **kwargs)).items() if role == blockwise.QUERY}


def _q_projections(model):
    return [layer.self_attn.q_proj for layer in model.model.layers]


def _input_moments(model, modules: dict, batches: list[dict]) -> dict:
    """key -> E[[x; 1][x; 1]^T] of each module's input over the model's forwards on `batches`, from hooks on the
    stock model run whole: written independently of the stream."""
    inputs = {}

    def keep(key):
        return lambda module, args: inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [module.register_forward_pre_hook(keep(key)) for key, module in modules.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    result = {}
    for key, xs in inputs.items():
        x = torch.cat(xs).double()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, d + 1)
        result[key] = xa.T @ xa
    return result


def _reference_moments(model_dir, tokens, attention_inputs=_q_projections):
    """Layer -> moments of every attention input (q_proj's, by default) of the stock decoder-only model."""
    model = load_model(model_dir)
    return _input_moments(model, dict(enumerate(attention_inputs(model))),
                          [{"input_ids": tokens[start:start + 8]} for start in range(0, len(tokens), 8)])


@pytest.mark.parametrize("family", LAYER_METHOD_FAMILIES, ids=lambda f: f.model_type)
def test_blockwise_moments_equal_a_full_forward(family, family_dirs):
    src = family_dirs[family.model_type]
    tokens = _tokens()
    ours = _streamed(src, family.model_type, tokens)
    reference = _reference_moments(src, tokens)
    assert sorted(ours) == sorted(reference)
    for i in reference:
        assert ours[i].count == len(tokens) * tokens.shape[1]
        torch.testing.assert_close(ours[i].total, reference[i], rtol=1e-9, atol=1e-9)


def test_streamed_moments_run_only_as_far_as_asked(family_dirs):
    blocks = [spec_for("llama").block]
    stream = blockwise.BlockStream(family_dirs["llama"], blocks, _tokens())
    expected = _streamed(family_dirs["llama"], "llama", _tokens())
    steps = iter(stream)
    first = next(steps)
    assert list(first.moments) == [("self", blockwise.QUERY, 0)]
    torch.testing.assert_close(first.moments[("self", blockwise.QUERY, 0)].total, expected[0].total, rtol=0, atol=0)
    assert _live_blocks(stream) == ["model.layers.0"], "layer 1 has not run yet"
    second = next(steps)
    assert first.moments == {}, "a step's moments are let go once the next step runs"
    torch.testing.assert_close(second.moments[("self", blockwise.QUERY, 1)].total, expected[1].total, rtol=0, atol=0)
    steps.close()  # the conversion loop closes the stream after its last unit
    assert _live_blocks(stream) == [] and stream.outputs == {}
    assert all(p.device.type == "meta" for p in stream.model.parameters())


def test_a_checkpoint_without_a_tensor_calibration_needs_is_refused(family_dirs, tmp_path):
    """A missing embedding is refused, not made up by the model's initialisation (only parameters the model's
    class says no checkpoint holds are, such as Marian's sinusoidal positions)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gqa_toolkit.convert.errors import ConversionError

    src = tmp_path / "llama"
    shutil.copytree(family_dirs["llama"], src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="no tensor for 'model.embed_tokens.weight'"):
        blockwise.BlockStream(src, [spec_for("llama").block], _tokens())


def _live_blocks(stream) -> list[str]:
    """The blocks (stack.index) with a parameter off the meta device."""
    return sorted(f"{name}.{i}" for name, blocks in stream.originals.items() for i, block in enumerate(blocks)
                  if any(p.device.type != "meta" for p in block.parameters()))


@pytest.mark.parametrize("model_type", ["llama", "t5"])
def test_one_block_at_a_time(model_type, family_dirs, no_native_dirs, monkeypatch):
    src = {**family_dirs, **no_native_dirs}[model_type]
    live_per_call, streams = [], []
    real_run = blockwise._run

    def counting(layer, call):
        live_per_call.append(_live_blocks(streams[0]))
        return real_run(layer, call)

    monkeypatch.setattr(blockwise, "_run", counting)
    stream = blockwise.BlockStream(src, spec_for(model_type).blocks, _tokens())
    streams.append(stream)
    moments = _moments(stream)
    assert live_per_call and all(len(live) == 1 for live in live_per_call), live_per_call
    # 10 sequences: two batches per block, each stack in the order the forward reaches it
    order = [live[0] for live in live_per_call][::2]
    if model_type == "llama":
        assert order == ["model.layers.0", "model.layers.1"] and len(moments) == 2
    else:
        assert order == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
        assert len(moments) == 2 * (1 + 2 + 1)  # per layer: the encoder's and the decoder's Q, cross Q and K
    assert _live_blocks(stream) == []
    assert all(p.device.type == "meta" for p in stream.model.parameters())  # the embeddings freed at the end


@pytest.fixture
def handed_out(monkeypatch) -> dict:
    """Every moment the converter takes from the stream, by (kind, role, layer)."""
    import gqa_toolkit.convert.run as run

    seen = {}
    real = run.convert_unit

    def recording(unit, read, how, moments=None, key_moments=None):
        seen[(unit.kind, blockwise.QUERY, unit.layer)] = moments
        if key_moments is not None:
            seen[(unit.kind, blockwise.KEYS, unit.layer)] = key_moments
        return real(unit, read, how, moments, key_moments)

    monkeypatch.setattr(run, "convert_unit", recording)
    return seen


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "falcon", "phi3"])
def test_sequential_mode_calibrates_each_layer_on_the_converted_model(model_type, family_dirs, no_native_dirs,
                                                                      tmp_path, handed_out):
    """In sequential mode layer i's moments are those of the converted checkpoint itself (loaded by transformers,
    K/V with G heads, fused ones split and re-fused by the family's layout), not of the source: the layers before
    it are the converted ones."""
    from gqa_toolkit.convert import convert_checkpoint

    src, tokens = {**family_dirs, **no_native_dirs}[model_type], _tokens()
    inputs = ATTENTION_INPUTS.get(model_type, _q_projections)
    out = convert_checkpoint(src, tmp_path / "out", method="fit", groups=2, calibration=tokens,
                             calibration_mode="sequential", progress=False)
    converted = _reference_moments(out, tokens, inputs)
    source = _reference_moments(src, tokens, inputs)
    query = {layer: moments for (_, _, layer), moments in handed_out.items()}
    torch.testing.assert_close(query[0].total, source[0], rtol=1e-9, atol=1e-9)  # nothing before layer 0
    torch.testing.assert_close(query[1].total, converted[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(converted[1], source[1], rtol=1e-3)
    record = __import__("json").loads((out / "config.json").read_text())["gqa_conversion"]
    assert record["calibration_mode"] == "sequential"


def test_sequential_mode_on_an_earlier_output_of_the_toolkit(no_native_dirs, tmp_path, handed_out):
    """A toolkit output (gpt_neox at G = 2, the toolkit's own modeling) converted again to MQA: its blocks are
    streamed through that modeling, and the converted K/V are repeated back to its 2 heads, not the original 4."""
    from gqa_toolkit.convert import convert_checkpoint

    tokens, inputs = _tokens(), ATTENTION_INPUTS["gpt_neox"]
    g2 = convert_checkpoint(no_native_dirs["gpt_neox"], tmp_path / "g2", method="mean", groups=2, progress=False)
    out = convert_checkpoint(g2, tmp_path / "g1", method="fit", groups=1, calibration=tokens,
                             calibration_mode="sequential", progress=False)
    converted, source = _reference_moments(out, tokens, inputs), _reference_moments(g2, tokens, inputs)
    query = {layer: moments for (_, _, layer), moments in handed_out.items()}
    torch.testing.assert_close(query[0].total, source[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(query[1].total, converted[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(converted[1], source[1], rtol=1e-3)


def test_each_block_gets_its_own_mask(tmp_path):
    """gemma2 alternates sliding-window and full attention: with calibration longer than the window, each block
    must be replayed with the mask the model gives it, not the first block's."""
    from conftest import save_tiny_model
    from families import BASE

    src = save_tiny_model(tmp_path / "gemma2", "gemma2", {**BASE, "head_dim": 16, "num_hidden_layers": 3,
                                                          "sliding_window": 4})
    tokens = _tokens()
    ours = _streamed(src, "gemma2", tokens)
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
    "opt": lambda m: [layer.self_attn.q_proj for layer in m.model.decoder.layers],
}


@pytest.mark.parametrize("model_type", ATTENTION_INPUTS)
def test_blockwise_moments_of_other_layouts(model_type, no_native_dirs, family_dirs):
    src, tokens = {**family_dirs, **no_native_dirs}[model_type], _tokens()
    ours = _streamed(src, model_type, tokens)
    reference = _reference_moments(src, tokens, ATTENTION_INPUTS[model_type])
    assert sorted(ours) == sorted(reference)
    for i in reference:
        torch.testing.assert_close(ours[i].total, reference[i], rtol=1e-9, atol=1e-9)


def _bart_like(m):
    return {("encoder", "query"): [layer.self_attn.q_proj for layer in m.model.encoder.layers],
            ("decoder", "query"): [layer.self_attn.q_proj for layer in m.model.decoder.layers],
            ("cross", "query"): [layer.encoder_attn.q_proj for layer in m.model.decoder.layers],
            ("cross", "keys"): [layer.encoder_attn.k_proj for layer in m.model.decoder.layers]}


SEQ2SEQ_INPUTS = {  # (attention kind, role) -> the stock modules whose input it is, from each stock layout
    "t5": lambda m: {("encoder", "query"): [block.layer[0].SelfAttention.q for block in m.encoder.block],
                     ("decoder", "query"): [block.layer[0].SelfAttention.q for block in m.decoder.block],
                     ("cross", "query"): [block.layer[1].EncDecAttention.q for block in m.decoder.block],
                     ("cross", "keys"): [block.layer[1].EncDecAttention.k for block in m.decoder.block]},
    "bart": _bart_like, "mbart": _bart_like, "marian": _bart_like,
}


def _seq2seq_reference(model_dir, model_type, tokens):
    """(kind, role, layer) -> moments, of the stock encoder-decoder, its decoder reading the tokens shifted right
    by the stock model's own rule."""
    import transformers

    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    modules = {(*kind_role, i): module for kind_role, modules in SEQ2SEQ_INPUTS[model_type](model).items()
               for i, module in enumerate(modules)}
    batches = [tokens[start:start + 8] for start in range(0, len(tokens), 8)]
    return _input_moments(model, modules, [{"input_ids": ids, "decoder_input_ids":
                                            model.prepare_decoder_input_ids_from_labels(labels=ids)}
                                           for ids in batches])


@pytest.mark.parametrize("model_type", SEQ2SEQ_INPUTS)
def test_encoder_decoder_moments_equal_a_full_forward(model_type, no_native_dirs):
    """The encoder's stack runs first, block by block, then the decoder's given the encoder's states: every
    attention input's moments, cross-attention's keys included, are those of the stock model run whole (t5's
    relative position bias, made by block 0 of each stack, reaches the later blocks as the model hands it on)."""
    src = no_native_dirs[model_type]
    tokens = torch.randint(3, 128, (10, 12), generator=torch.Generator().manual_seed(2))
    ours = _moments(blockwise.BlockStream(src, spec_for(model_type).blocks, tokens))
    reference = _seq2seq_reference(src, model_type, tokens)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        assert ours[key].count == tokens.numel(), key
        torch.testing.assert_close(ours[key].total, reference[key], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(ours["cross", "keys", 0].total, ours["cross", "query", 0].total)


def test_sequential_mode_on_an_encoder_decoder(no_native_dirs, tmp_path, handed_out):
    """t5 with --attention all in sequential mode: each encoder layer's queries, the decoder's and cross-attention's
    keys (the converted encoder's states) are those of the converted checkpoint itself, loaded by stock
    transformers; cross-attention's queries follow the source's self-attention of their own block."""
    from gqa_toolkit.convert import convert_checkpoint

    src = no_native_dirs["t5"]
    tokens = torch.randint(3, 128, (10, 12), generator=torch.Generator().manual_seed(2))
    out = convert_checkpoint(src, tmp_path / "out", method="fit", groups=2, calibration=tokens, attention="all",
                             calibration_mode="sequential", progress=False)
    converted, source = _seq2seq_reference(out, "t5", tokens), _seq2seq_reference(src, "t5", tokens)
    assert sorted(handed_out) == sorted(converted)
    for key, moments in handed_out.items():
        if key[:2] != ("cross", "query"):
            torch.testing.assert_close(moments.total, converted[key], rtol=1e-6, atol=1e-6)
    for key in (("encoder", "query", 1), ("cross", "keys", 0), ("decoder", "query", 1)):
        assert not torch.allclose(converted[key], source[key], rtol=1e-3), key
    record = __import__("json").loads((out / "config.json").read_text())["gqa_conversion"]
    assert record["calibration_mode"] == "sequential"
