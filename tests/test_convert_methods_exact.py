"""Exactness of the layer methods against stock transformers logits.

Each test edits or builds a stock model with its own code (rotation matrices written out here, not taken from the
converter), converts it, and compares logits with the stock model's: permutation alone, alignment alone and
`fit` with every head kept preserve the function; `aligned` and `fit` merge heads that are RoPE-commuting
rotations of one another with no loss, which mean-pooling cannot.
"""

import pytest
import torch
from conftest import build_tiny_model, load_model, logits, read_config
from families import FAMILIES, NO_NATIVE_FAMILIES, family_config

from gqa_toolkit.convert import AttentionWeights, ConversionError, align_layer, convert_checkpoint
from gqa_toolkit.families.rope import RopeLayout
from gqa_toolkit.convert.methods.layer import permute_layer

# model_type -> (config changes, rotary dims of a 16-dim head, interleaved pairs): full RoPE, RoPE with GQA and
# q/k/v biases, partial RoPE with phi's `dense` output, OPT with no RoPE (every key dim free), and GPT-J's partial
# RoPE on interleaved pairs (2i, 2i + 1)
CASES = {
    "llama": ({}, 16, False),
    "qwen2": ({"num_key_value_heads": 2}, 16, False),
    "phi": ({"partial_rotary_factor": 0.5}, 8, False),
    "opt": (None, 0, False),
    "gptj": (None, 8, True),
}


def _config(model_type):
    own = {f.model_type: f.config for f in NO_NATIVE_FAMILIES}
    if model_type in own:
        return own[model_type]
    family = next(f for f in FAMILIES if f.model_type == model_type)
    return {**family_config(family), **CASES[model_type][0]}


def _rope(model_type, hd) -> RopeLayout:
    _, rotary_dims, interleaved = CASES[model_type]
    return RopeLayout(hd, rotary_dims, interleaved)


def _projections(attn):
    o = next(getattr(attn, n) for n in ("o_proj", "dense", "out_proj") if hasattr(attn, n))
    return attn.q_proj, attn.k_proj, attn.v_proj, o


def _attentions(model):
    return [m for name, m in model.named_modules() if name.endswith(("self_attn", ".attn"))]


def _geometry(model):
    cfg = model.config
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "num_key_value_heads", None) or heads, cfg.hidden_size // heads


def _weights(attn) -> AttentionWeights:
    q, k, v, o = _projections(attn)
    return AttentionWeights(q.weight, k.weight, v.weight, o.weight, q.bias, k.bias, v.bias)


def _load(attn, w: AttentionWeights) -> None:
    for proj, weight, bias in zip(_projections(attn), (w.q, w.k, w.v, w.o), (w.q_bias, w.k_bias, w.v_bias, None)):
        proj.weight.copy_(weight)
        if bias is not None:
            proj.bias.copy_(bias)


def _rope_rotation(hd: int, rot: int, interleaved: bool, g: torch.Generator) -> torch.Tensor:
    """A key map that commutes with RoPE: a rotation by its own angle on each pair (i, i + rot/2) under
    rotate_half, (2i, 2i + 1) when interleaved; any orthogonal map on the dims past `rot`."""
    m = torch.zeros(hd, hd)
    half = rot // 2
    for i, angle in enumerate(torch.rand(half, generator=g) * 6.28):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        c, s = torch.cos(angle), torch.sin(angle)
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    if hd > rot:
        m[rot:, rot:] = torch.linalg.qr(torch.randn(hd - rot, hd - rot, generator=g))[0]
    return m


@pytest.mark.parametrize("model_type", CASES)
def test_permutation_alone_keeps_logits(model_type):
    model = build_tiny_model(model_type, _config(model_type))
    before = logits(model)
    heads, kv_heads, _ = _geometry(model)
    first_k = _attentions(model)[0].k_proj.weight.clone()
    with torch.no_grad():
        for attn in _attentions(model):
            _load(attn, permute_layer(_weights(attn), heads=heads, kv_heads=kv_heads,
                                      order=list(reversed(range(kv_heads)))))
    assert not torch.equal(_attentions(model)[0].k_proj.weight, first_k)  # the heads really moved
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", CASES)
def test_alignment_alone_keeps_logits(model_type):
    model = build_tiny_model(model_type, _config(model_type))
    before = logits(model)
    heads, kv_heads, hd = _geometry(model)
    rope = _rope(model_type, hd)
    with torch.no_grad():
        for attn in _attentions(model):
            source = _weights(attn)
            aligned = align_layer(source, heads=heads, kv_heads=kv_heads, groups=1, rope=rope)
            assert not torch.allclose(aligned.k, source.k, atol=1e-3)  # the heads really were rotated
            _load(attn, aligned)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def _rotated_copies_model(model_type, path):
    """A stock model whose KV heads are RoPE-commuting rotations (keys) and orthogonal maps (values) of head 0."""
    model = build_tiny_model(model_type, _config(model_type))
    heads, kv_heads, hd = _geometry(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for attn in _attentions(model):
            _, k, v, _ = _projections(attn)
            for proj, is_key in ((k, True), (v, False)):
                w = proj.weight.view(kv_heads, hd, -1)  # (G0, hd, d)
                b = proj.bias.view(kv_heads, hd) if proj.bias is not None else None
                for j in range(1, kv_heads):
                    m = _rope_rotation(hd, *CASES[model_type][1:], g) if is_key else \
                        torch.linalg.qr(torch.randn(hd, hd, generator=g))[0]
                    w[j] = m @ w[0]
                    if b is not None:
                        b[j] = m @ b[0]
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("method", ["aligned", "fit"])
@pytest.mark.parametrize("model_type", CASES)
def test_rotated_copies_merge_exactly(model_type, method, tmp_path):
    src, model = _rotated_copies_model(model_type, tmp_path / "src")
    expected = logits(model)
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    out = convert_checkpoint(src, tmp_path / method, method=method, groups=1, progress=False,
                             calibration=calibration if method == "fit" else None)
    torch.testing.assert_close(logits(load_model(out)), expected, rtol=1e-4, atol=1e-4)
    mean = convert_checkpoint(src, tmp_path / "mean", method="mean", groups=1, progress=False)
    assert not torch.allclose(logits(load_model(mean)), expected, atol=1e-2)  # mean-pooling cannot do this


@pytest.mark.parametrize("model_type", CASES)
def test_fit_with_every_head_kept_is_exact(model_type, tmp_path):
    model = build_tiny_model(model_type, _config(model_type))
    model.save_pretrained(tmp_path / "src")
    _, kv_heads, _ = _geometry(model)
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    out = convert_checkpoint(tmp_path / "src", tmp_path / "fit", method="fit", groups=kv_heads, progress=False,
                             calibration=calibration)
    torch.testing.assert_close(logits(load_model(out)), logits(model), rtol=1e-4, atol=1e-4)


def test_similarity_grouping_finds_duplicate_heads(tmp_path):
    """KV heads 2 and 3 copy heads 0 and 1: similarity groups {0, 2} and {1, 3}, moving query rows and output
    columns along, so mean-pooling becomes exact; contiguous groups {0, 1}, {2, 3} are not."""
    model = build_tiny_model("llama", _config("llama"))
    with torch.no_grad():
        for attn in _attentions(model):
            for proj in (attn.k_proj, attn.v_proj):
                w = proj.weight.view(4, 16, -1)  # (G0, hd, d)
                w[2], w[3] = w[0].clone(), w[1].clone()
    model.save_pretrained(tmp_path / "src")
    expected = logits(model)
    out = convert_checkpoint(tmp_path / "src", tmp_path / "sim", method="mean", groups=2, grouping="similarity",
                             progress=False)
    torch.testing.assert_close(logits(load_model(out)), expected, rtol=1e-5, atol=1e-5)
    plain = convert_checkpoint(tmp_path / "src", tmp_path / "plain", method="mean", groups=2, progress=False)
    assert not torch.allclose(logits(load_model(plain)), expected, atol=1e-3)


def test_new_methods_lose_less_than_mean_pooling(tmp_path):
    """On a random llama at MQA, alignment and fitting keep more of the function than mean-pooling."""
    model = build_tiny_model("llama", _config("llama"))
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        p = model(input_ids=ids).logits.log_softmax(-1)

    def kl(method):
        out = convert_checkpoint(tmp_path / "src", tmp_path / method, method=method, groups=1, progress=False,
                                 calibration=ids if method == "fit" else None)
        with torch.no_grad():
            q = load_model(out)(input_ids=ids).logits.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    mean = kl("mean")
    assert kl("aligned") < mean and kl("fit") < mean


def test_layer_methods_refuse_unsupported_families(family_dirs, tmp_path):
    with pytest.raises(ConversionError, match="supports model types .*llama.*'gpt_bigcode' is not one"):
        convert_checkpoint(family_dirs["gpt_bigcode"], tmp_path / "o", method="aligned", groups=1, progress=False)
    with pytest.raises(ConversionError, match="per-head query/key norms"):
        convert_checkpoint(family_dirs["qwen3"], tmp_path / "o", method="fit", groups=2, progress=False,
                           calibration="none")
    with pytest.raises(ConversionError, match="fits each head's scale itself"):
        convert_checkpoint(family_dirs["llama"], tmp_path / "o", method="fit", groups=2, preserve_norm=True,
                           progress=False)


def _kl_to(source, model_dir, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        p = source(input_ids=ids).logits.log_softmax(-1)
        q = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("model_type", ["gpt_neox", "bloom", "phi3", "falcon", "gpt2"])
def test_layer_methods_on_a_fused_layout(model_type, no_native_dirs, family_dirs, tmp_path):
    """gpt_neox, bloom and falcon fuse q, k and v per group, phi3 as [q | k | v], gpt2 as [q | k | v] columns of a
    transposed Conv1D: the layer path splits the fused tensor by the spec's layout and re-fuses it with G heads. `fit` keeping every head is exact; at G = 2 and at MQA,
    alignment and fitting keep more of the function than mean-pooling. Measured against the stock source."""
    from transformers import AutoModelForCausalLM

    src = {**family_dirs, **no_native_dirs}[model_type]
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))

    def kl(method, groups):
        out = convert_checkpoint(src, tmp_path / f"{method}{groups}", method=method, groups=groups, progress=False,
                                 calibration=ids if method == "fit" else None)
        return _kl_to(source, out, ids)

    assert abs(kl("fit", 4)) < 1e-6
    for groups in (2, 1):
        mean = kl("mean", groups)
        assert kl("aligned", groups) < mean and kl("fit", groups) < mean / 3


@pytest.mark.parametrize("scope", ["decoder", "all"])
@pytest.mark.parametrize("model_type", ["t5", "bart", "mbart", "marian", "whisper"])
def test_layer_methods_on_an_encoder_decoder(model_type, scope, no_native_dirs, tmp_path):
    """t5's and the BART family's decoder self- and cross-attention (and the encoder's with --attention all), one
    block per attention kind, on the weights alone: `fit` keeping every head is exact, and at G = 2 and at MQA
    alignment and fitting keep more of the function than mean-pooling. Measured against the stock source."""
    from families import encoder_inputs

    family = next(f for f in NO_NATIVE_FAMILIES if f.model_type == model_type)
    src = no_native_dirs[model_type]
    ids = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    inputs = {**encoder_inputs(family, ids), "decoder_input_ids": ids[:, :10]}

    def kl(method, groups):
        out = convert_checkpoint(src, tmp_path / f"{method}{groups}", method=method, groups=groups, attention=scope,
                                 calibration="none" if method == "fit" else None, progress=False)
        return _seq2seq_kl(family, src, out, inputs)

    assert abs(kl("fit", family.heads)) < 1e-6
    for groups in (2, 1):
        mean = kl("mean", groups)
        assert kl("aligned", groups) < mean and kl("fit", groups) < mean


def _seq2seq_kl(family, src, out, inputs) -> float:
    import transformers

    auto = getattr(transformers, family.auto)
    with torch.no_grad():
        p = auto.from_pretrained(src).eval()(**inputs).logits.log_softmax(-1)
        q = auto.from_pretrained(out).eval()(**inputs).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("model_type", ["t5", "bart", "mbart", "marian"])
def test_calibrated_layer_methods_on_an_encoder_decoder(model_type, no_native_dirs, tmp_path):
    """The decoder reads the calibration tokens shifted right behind its start token; cross-attention's K/V maps
    are weighed by the encoder's states. `fit` keeping every head stays exact, and on text like the calibration's
    the calibrated fit loses less than the fit on weights alone, at G = 2 and at MQA."""
    family = next(f for f in NO_NATIVE_FAMILIES if f.model_type == model_type)
    src = no_native_dirs[model_type]
    g = torch.Generator().manual_seed(7)
    calibration = torch.randint(3, 128, (16, 16), generator=g)
    ids = torch.randint(3, 128, (4, 16), generator=g)  # held out, drawn as the calibration was
    start = torch.full((4, 1), read_config(src)["decoder_start_token_id"])
    inputs = {"input_ids": ids, "decoder_input_ids": torch.cat([start, ids[:, :-1]], 1)}

    def kl(groups, calibrated):
        out = convert_checkpoint(src, tmp_path / f"fit{groups}{calibrated}", method="fit", groups=groups,
                                 calibration=calibration if calibrated else "none", progress=False)
        if calibrated:
            record = read_config(out)["gqa_conversion"]
            assert record["calibration_tokens"] == calibration.numel()
        return _seq2seq_kl(family, src, out, inputs)

    assert abs(kl(family.heads, True)) < 1e-6
    for groups in (2, 1):
        assert kl(groups, True) < kl(groups, False)


def test_calibration_the_encoder_decoder_cannot_run_is_refused_with_the_fix(no_native_dirs, tmp_path):
    with pytest.raises(ConversionError, match="calibration for whisper takes audio, and token ids is not a folder of "
                                              "wav/flac clips; pass --calibration FOLDER"):
        convert_checkpoint(no_native_dirs["whisper"], tmp_path / "w", method="fit", groups=2,
                           calibration=torch.zeros(2, 8, dtype=torch.long), progress=False)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("model_type", ["t5", "bloom"])
def test_similarity_grouping_is_refused_where_a_bias_belongs_to_each_head_position(model_type, no_native_dirs,
                                                                                    tmp_path):
    """t5's relative bias and bloom's ALiBi slopes follow the head's position: reversing the heads changes the
    stock model's logits (checked here), so the converter refuses to move them."""
    import transformers

    family = next(f for f in NO_NATIVE_FAMILIES if f.model_type == model_type)
    model = getattr(transformers, family.auto).from_pretrained(no_native_dirs[model_type]).eval()
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, **({"decoder_input_ids": ids} if model.config.is_encoder_decoder else {})}
    with torch.no_grad():
        before = model(**inputs).logits
        for module in model.modules():  # the query, key and value heads and the output columns, in reverse order
            heads = getattr(module, "n_heads", None) or getattr(module, "num_heads", None)
            for name in ("q", "k", "v", "query_key_value"):
                proj = getattr(module, name, None)
                if heads and proj is not None:
                    proj.weight.copy_(proj.weight.view(heads, -1, proj.weight.shape[1]).flip(0).reshape_as(proj.weight))
                    if proj.bias is not None:
                        proj.bias.copy_(proj.bias.view(heads, -1).flip(0).reshape_as(proj.bias))
            for name in ("o", "dense"):
                proj = getattr(module, name, None)
                if heads and proj is not None and hasattr(module, "query_key_value" if name == "dense" else "q"):
                    proj.weight.copy_(proj.weight.view(proj.weight.shape[0], heads, -1).flip(1).reshape_as(proj.weight))
        assert not torch.allclose(model(**inputs).logits, before, atol=1e-3)
    with pytest.raises(ConversionError, match="bias that belongs to each head's position.*--grouping contiguous"):
        convert_checkpoint(no_native_dirs[model_type], tmp_path / "o", groups=2, grouping="similarity",
                           calibration="none", progress=False)
    assert not (tmp_path / "o").exists()
