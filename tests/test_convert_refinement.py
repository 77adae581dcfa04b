"""Block-wise refinement: each converted attention unit trained against the source's attention output on the
calibration activations. It lowers every unit's error, and the whole model's KL to the stock source on held-out
tokens drawn as the calibration was, on a decoder with RoPE, a fused Conv1D layout and an encoder-decoder."""

import pytest
import torch
import transformers
from conftest import build_tiny_model, build_tiny_no_native, read_config
from families import FAMILIES, NO_NATIVE_FAMILIES, family_config

from gqa_toolkit.convert import ConversionError, convert, convert_checkpoint


def _stock(model_type):
    """The source model, and the Auto class that loads it and its conversion."""
    own = {f.model_type: f for f in NO_NATIVE_FAMILIES}
    if model_type in own:
        return build_tiny_no_native(own[model_type]), getattr(transformers, own[model_type].auto)
    family = next(f for f in FAMILIES if f.model_type == model_type)
    return build_tiny_model(model_type, family_config(family)), transformers.AutoModelForCausalLM


def _inputs(model_type, ids, src):
    if model_type != "t5":
        return {"input_ids": ids}
    start = torch.full((len(ids), 1), read_config(src)["decoder_start_token_id"])
    return {"input_ids": ids, "decoder_input_ids": torch.cat([start, ids[:, :-1]], 1)}


@pytest.mark.slow
@pytest.mark.parametrize("model_type, precision", [("llama", "fp32"), ("llama", "bf16"), ("gpt2", "bf16"),
                                                   ("t5", "bf16")])
def test_refinement_lowers_each_units_error_and_the_models_kl(model_type, precision, tmp_path):
    model, auto = _stock(model_type)
    model.save_pretrained(tmp_path / "src")
    g = torch.Generator().manual_seed(3)
    calibration = torch.randint(3, 128, (16, 24), generator=g)
    held_out = _inputs(model_type, torch.randint(3, 128, (4, 24), generator=g), tmp_path / "src")
    with torch.no_grad():
        p = model(**held_out).logits.log_softmax(-1)  # the stock source, built independently of the converter

    def kl(steps):
        # from mean-pooling, far from the best: `fit` on a random model starts too close for a clear margin
        result = convert(tmp_path / "src", tmp_path / f"r{steps}", method="mean", groups=1,
                         calibration=calibration if steps else None, refine_steps=steps, refine_precision=precision,
                         progress=False)
        with torch.no_grad():
            q = auto.from_pretrained(result.output).eval()(**held_out).logits.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item(), result

    plain, _ = kl(0)
    refined, result = kl(60)
    units = result.refinement_error
    assert units and all(after < before for before, after in units.values()), units
    record = read_config(result.output)["gqa_conversion"]
    assert record["refine_steps"] == 60 and record["refinement_error"] == units
    assert record["refine_precision"] == precision
    assert refined < plain, (refined, plain)


def test_refinement_needs_calibration(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match="--refine-steps trains on calibration activations"):
        convert_checkpoint(llama_dir, tmp_path / "o", groups=2, method="fit", calibration="none", refine_steps=5,
                           progress=False)
    with pytest.raises(ConversionError, match="--refine-steps -1 must be a whole number"):
        convert_checkpoint(llama_dir, tmp_path / "o", groups=2, refine_steps=-1, progress=False)
    assert not (tmp_path / "o").exists()


def test_the_layer_apis_attention_equals_stock_llama_attention():
    """Refinement through convert_layer trains against this module: it computes what a stock llama layer's
    attention computes (RoPE by rotate_half, causal, K/V heads shared by contiguous query heads)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from gqa_toolkit.convert import AttentionWeights, RopeLayout
    from gqa_toolkit.convert.methods.layer_attention import LayerAttention

    model = build_tiny_model("llama", family_config(next(f for f in FAMILIES if f.model_type == "llama")))
    config, attention = model.config, model.model.layers[0].self_attn
    x = torch.randn(2, 12, config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12)[None].expand(2, -1)
    with torch.no_grad():
        expected = attention(x, position_embeddings=LlamaRotaryEmbedding(config)(x, positions),
                             attention_mask=torch.full((12, 12), float("-inf")).triu(1)[None, None])[0]
        w = AttentionWeights(attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight,
                             attention.o_proj.weight)
        hd = config.hidden_size // config.num_attention_heads
        ours = LayerAttention(w, config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                              RopeLayout(hd, hd), causal=True, theta=config.rope_parameters["rope_theta"])(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal, rotary, precision", [(True, 16, "fp32"), (False, 0, "fp32"), (True, 16, "bf16")])
def test_convert_layer_refines_against_the_attention_output(causal, rotary, precision):
    """The layer API for people with their own attention code (encoders included): refinement lowers the error of
    the attention output on held-out inputs from mean-pooling, and never raises it (fit's start, close to the best
    here, is kept when training does not beat it on the calibration batch it holds out)."""
    from gqa_toolkit.convert import AttentionWeights, RopeLayout, convert_layer
    from gqa_toolkit.convert.methods.layer_attention import LayerAttention

    g = torch.Generator().manual_seed(1)
    d, heads, hd = 32, 4, 8

    def grouped(scale):  # K/V heads alike within each pair (a shared head plus noise): GQA can keep much
        shared = torch.randn(2, 1, hd, d, generator=g).expand(-1, 2, -1, -1)  # (G, H/G, hd, d)
        return ((shared + scale * torch.randn(2, 2, hd, d, generator=g)) * 0.3).reshape(heads * hd, d)

    w = AttentionWeights(torch.randn(heads * hd, d, generator=g) * 0.3, grouped(0.5), grouped(0.5),
                         torch.randn(d, heads * hd, generator=g) * 0.3)
    rope = RopeLayout(hd, min(rotary, hd))
    calibration, held_out = torch.randn(64, 16, d, generator=g), torch.randn(8, 16, d, generator=g)

    def error(converted, kv):
        def run(weights, n):
            return LayerAttention(weights, heads, n, rope, causal=causal, theta=10000.0)(held_out)
        with torch.no_grad():
            return float((run(converted, kv) - run(w, heads)).pow(2).sum() / run(w, heads).pow(2).sum())

    for method in ("mean", "fit"):
        plain = convert_layer(w, heads=heads, kv_heads=heads, groups=2, method=method, rope=rope,
                              calibration=calibration)
        refined = convert_layer(w, heads=heads, kv_heads=heads, groups=2, method=method, rope=rope,
                                calibration=calibration, refine_steps=150, causal=causal, refine_precision=precision)
        assert error(refined, 2) < error(plain, 2) if method == "mean" else error(refined, 2) <= error(plain, 2)


def test_refine_batch_sets_the_sequences_of_each_step(llama_dir, tmp_path, monkeypatch):
    from gqa_toolkit.convert import run

    batches, real = [], run.refine_unit

    def recording(converted, attention, settings, to_source):
        batches.append([len(next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.dim() == 3))
                        for args, kwargs in attention.calls])
        return real(converted, attention, settings, to_source)

    monkeypatch.setattr(run, "refine_unit", recording)
    calibration = torch.randint(3, 128, (10, 16), generator=torch.Generator().manual_seed(2))
    result = convert(llama_dir, tmp_path / "out", method="fit", groups=1, calibration=calibration, refine_steps=2,
                     refine_batch=4, progress=False)
    assert batches and all(b == [4, 4, 2] for b in batches), batches
    assert read_config(result.output)["gqa_conversion"]["refine_batch"] == 4
    with pytest.raises(ConversionError, match="--refine-batch 0 must be at least 1"):
        convert(llama_dir, tmp_path / "bad", method="fit", groups=1, calibration=calibration, refine_steps=2,
                refine_batch=0, progress=False)
    assert not (tmp_path / "bad").exists()


def test_auto_precision_is_bf16_where_the_device_multiplies_bf16_and_is_recorded(llama_dir, tmp_path):
    from gqa_toolkit.dtypes import computes_bf16

    calibration = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(4))
    result = convert(llama_dir, tmp_path / "out", method="fit", groups=1, calibration=calibration, refine_steps=2,
                     refine_batch=3, device="cpu", progress=False)
    expected = "bf16" if computes_bf16(torch.device("cpu")) else "fp32"
    assert read_config(result.output)["gqa_conversion"]["refine_precision"] == expected
    for bad in ("float16", "BF16"):
        with pytest.raises(ConversionError, match=f"unknown refine precision '{bad}'; choose one of: auto, bf16"):
            convert(llama_dir, tmp_path / "bad", method="fit", groups=1, calibration=calibration, refine_steps=2,
                    refine_precision=bad, progress=False)
    assert not (tmp_path / "bad").exists()


def test_the_cli_takes_the_refine_precision(uptrain_models, tmp_path):
    from click.testing import CliRunner

    from gqa_toolkit.convert.cli import main as convert_cli

    source = uptrain_models["mha"]  # a tiny llama with a tokenizer: the CLI calibrates on python-stdlib text
    result = CliRunner().invoke(convert_cli, [str(source), "-g", "1", "-m", "fit", "--refine-steps", "2",
                                              "--calibration-samples", "6", "--calibration-length", "16",
                                              "--refine-precision", "fp32", "-q", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "o")["gqa_conversion"]["refine_precision"] == "fp32"
    result = CliRunner().invoke(convert_cli, [str(source), "-g", "1", "--refine-precision", "fp16",
                                              "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and "'fp16' is not one of 'auto', 'bf16', 'fp32'" in result.output
    assert not (tmp_path / "p").exists()


def test_bf16_refinement_runs_the_stock_attention_core_in_float32_and_puts_its_implementation_back():
    """Under bf16 a stock module's projections run in bf16 and its SDPA in float32, with the masks and causality
    transformers decides: the output is the float32 module's within bf16 rounding of the projections, where
    SDPA in bf16 (what autocast alone gives) is further off; the block's config says sdpa again after."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from gqa_toolkit.convert.methods.refinement import _attention_core_in_float32

    model = build_tiny_model("llama", family_config(next(f for f in FAMILIES if f.model_type == "llama")))
    model.config._attn_implementation = "sdpa"
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    call = dict(position_embeddings=LlamaRotaryEmbedding(model.config)(x, torch.arange(12)[None].expand(2, -1)),
                attention_mask=None)  # causal by SDPA's is_causal, as transformers passes it for a full batch
    with torch.no_grad():
        expected = attention(x, **call)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = attention(x, **call)[0].float()
        with _attention_core_in_float32(attention, True), torch.autocast("cpu", dtype=torch.bfloat16):
            assert attention.config._attn_implementation != "sdpa"
            ours = attention(x, **call)[0].float()
    assert attention.config._attn_implementation == "sdpa"
    error = (ours - expected).pow(2).sum() / expected.pow(2).sum()
    assert error < 1e-3 and error < (plain - expected).pow(2).sum() / expected.pow(2).sum(), error
