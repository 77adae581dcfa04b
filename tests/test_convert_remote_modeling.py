"""GQA for the families transformers cannot express (t5, gpt_neox, gpt2, opt): the toolkit's modeling code.

Parity with stock transformers: G = H reproduces the source exactly; G < H equals the independent reference (the
stock MHA model with group means duplicated per head), logits and greedy tokens; the KV cache holds G heads; the
output directory loads with `trust_remote_code=True` in a process that cannot import gqa_toolkit.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import greedy_generate, read_config, skip_without_sdpa
from families import NO_NATIVE_FAMILIES, NO_NATIVE_IDS, encoder_inputs
from reference import apply_reference_no_native
from safetensors import safe_open

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.families.spec import spec_for
from gqa_toolkit.families.transformers_names import output_cache

GROUPS = 2


def _seq2seq(family) -> bool:
    return family.auto != "AutoModelForCausalLM"


def _load(family, model_dir, **kwargs):
    model, info = getattr(transformers, family.auto).from_pretrained(model_dir, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"transformers reports {problems} loading {model_dir}"
    return model.eval()


def _inputs(family, seed: int = 1) -> dict:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    if _seq2seq(family):
        return {**encoder_inputs(family, ids, seed=seed), "decoder_input_ids": ids[:, :7]}
    return {"input_ids": ids}


def _logits(model, family) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(family)).logits


def _greedy(model, family) -> torch.Tensor:
    first = {k: v[:1] for k, v in _inputs(family).items() if k != "decoder_input_ids"}
    return greedy_generate(model, **first, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)


def _kv_cache_shapes(model, family) -> list[tuple[int, ...]]:
    """Shapes of every cached key tensor after one forward pass: (B, KV heads, T, hd)."""
    with torch.no_grad():
        cache = output_cache(model(**_inputs(family), use_cache=True))
    caches = [cache.self_attention_cache, cache.cross_attention_cache] if _seq2seq(family) else [cache]
    return [tuple(layer.keys.shape) for c in caches for layer in c.layers]


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family", NO_NATIVE_FAMILIES, ids=NO_NATIVE_IDS)
def test_mean_with_all_heads_reproduces_source_exactly(family, no_native_dirs, tmp_path):
    src = no_native_dirs[family.model_type]
    out = convert_checkpoint(src, tmp_path / "out", groups=family.heads, progress=False)
    converted = _load(family, out)
    assert type(converted).__name__.startswith("GQA")
    torch.testing.assert_close(_logits(converted, family), _logits(_load(family, src), family), rtol=0, atol=0)


@pytest.mark.parametrize("family", NO_NATIVE_FAMILIES, ids=NO_NATIVE_IDS)
def test_grouped_equals_reference_and_caches_g_heads(family, no_native_dirs, tmp_path):
    src = no_native_dirs[family.model_type]
    out = convert_checkpoint(src, tmp_path / "out", groups=GROUPS, progress=False)
    config = read_config(out)
    spec = spec_for(family.model_type)
    kv_heads_attr = spec.kv_heads_attr_of(next(iter(spec.kinds(None))))  # whisper's is decoder_num_key_value_heads
    assert config[kv_heads_attr] == GROUPS and config["model_type"] == f"gqa_{family.model_type}"

    converted = _load(family, out)
    reference = _load(family, src)
    apply_reference_no_native(reference, family.model_type, GROUPS, "mean")
    torch.testing.assert_close(_logits(converted, family), _logits(reference, family), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(converted, family), _logits(_load(family, src), family), atol=1e-4)
    assert torch.equal(_greedy(converted, family), _greedy(reference, family))

    shapes = _kv_cache_shapes(converted, family)
    layers = 4 if _seq2seq(family) else 2  # encoder-decoders: decoder self-attention, then cross-attention
    assert len(shapes) == layers and all(s[1] == GROUPS and s[3] == family.head_dim for s in shapes), shapes
    assert all(s[1] == family.heads for s in _kv_cache_shapes(reference, family))


def _padded_inputs(family) -> dict:
    """A batch whose first row is left-padded: attention runs with a mask, as in batched generation."""
    if family.audio:
        pytest.skip("whisper's encoder takes whole 30 s windows, with no padding mask")
    inputs = _inputs(family)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :5] = 0
    return {**inputs, "attention_mask": mask}


@pytest.mark.parametrize("family", NO_NATIVE_FAMILIES, ids=NO_NATIVE_IDS)
def test_padded_batches_equal_reference(family, no_native_dirs, tmp_path):
    src = no_native_dirs[family.model_type]
    converted = _load(family, convert_checkpoint(src, tmp_path / "out", groups=GROUPS, progress=False))
    reference = _load(family, src)
    apply_reference_no_native(reference, family.model_type, GROUPS, "mean")
    inputs = _padded_inputs(family)
    with torch.no_grad():
        ours, theirs = converted(**inputs).logits, reference(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    generate = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "max_new_tokens": 6,
                "min_new_tokens": 6, "pad_token_id": 0}
    assert torch.equal(greedy_generate(converted, **generate), greedy_generate(reference, **generate))


@pytest.mark.parametrize("family", NO_NATIVE_FAMILIES, ids=NO_NATIVE_IDS)
def test_first_method_equals_reference(family, no_native_dirs, tmp_path):
    src = no_native_dirs[family.model_type]
    out = convert_checkpoint(src, tmp_path / "out", method="first", groups=1, progress=False)
    reference = _load(family, src)
    apply_reference_no_native(reference, family.model_type, 1, "first")
    torch.testing.assert_close(_logits(_load(family, out), family), _logits(reference, family), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", NO_NATIVE_FAMILIES, ids=NO_NATIVE_IDS)
def test_bfloat16_decodes_with_a_bfloat16_cache(family, no_native_dirs, tmp_path):
    """Every tensor of the attention stays in the model's dtype (GPT-J's rotary table on 5.16 included)."""
    out = convert_checkpoint(no_native_dirs[family.model_type], tmp_path / "out", groups=GROUPS, progress=False)
    model = _load(family, out, dtype=torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _inputs(family).items()}
    with torch.no_grad():
        result = model(**inputs, use_cache=True)
    assert result.logits.dtype == torch.bfloat16 and torch.isfinite(result.logits).all()
    cache = output_cache(result)
    caches = [cache.self_attention_cache, cache.cross_attention_cache] if _seq2seq(family) else [cache]
    assert {layer.keys.dtype for c in caches for layer in c.layers} == {torch.bfloat16}


@pytest.mark.parametrize("family", NO_NATIVE_FAMILIES, ids=NO_NATIVE_IDS)
def test_random_method_loads_and_caches_g_heads(family, no_native_dirs, tmp_path):
    out = convert_checkpoint(no_native_dirs[family.model_type], tmp_path / "out", method="random", groups=GROUPS,
                             progress=False)
    converted = _load(family, out)  # no missing, unexpected or mismatched keys
    assert torch.isfinite(_logits(converted, family)).all()
    assert all(s[1] == GROUPS for s in _kv_cache_shapes(converted, family))


def test_t5_default_scope_leaves_encoder_bit_identical(no_native_dirs, tmp_path):
    src = no_native_dirs["t5"]
    out = convert_checkpoint(src, tmp_path / "out", groups=GROUPS, progress=False)
    before, after = _tensors(src), _tensors(out)
    assert before.keys() == after.keys()
    for name, t in before.items():
        if name.startswith("encoder.") or "relative_attention_bias" in name:
            assert torch.equal(after[name], t), name
    assert after["decoder.block.1.layer.1.EncDecAttention.k.weight"].shape == (GROUPS * 8, 64)
    assert after["encoder.block.1.layer.0.SelfAttention.k.weight"].shape == (4 * 8, 64)
    config = read_config(out)
    assert config.get("encoder_num_key_value_heads") is None
    assert config["gqa_conversion"]["attention_kinds"] == ["decoder", "cross"]
    assert "decoder, cross" in (out / "README.md").read_text()


def test_t5_attention_all_converts_the_encoder_too(no_native_dirs, tmp_path):
    family = NO_NATIVE_FAMILIES[NO_NATIVE_IDS.index("t5")]
    src = no_native_dirs["t5"]
    out = convert_checkpoint(src, tmp_path / "out", groups=GROUPS, attention="all", progress=False)
    config = read_config(out)
    assert config["encoder_num_key_value_heads"] == GROUPS and config["num_key_value_heads"] == GROUPS
    assert _tensors(out)["encoder.block.0.layer.0.SelfAttention.v.weight"].shape == (GROUPS * 8, 64)
    converted = _load(family, out)
    assert converted.encoder.block[0].layer[0].SelfAttention.num_key_value_heads == GROUPS
    reference = _load(family, src)
    apply_reference_no_native(reference, "t5", GROUPS, "mean", scope="all")
    torch.testing.assert_close(_logits(converted, family), _logits(reference, family), rtol=1e-5, atol=1e-5)


def test_converted_checkpoint_converts_again(no_native_dirs, tmp_path):
    family = NO_NATIVE_FAMILIES[NO_NATIVE_IDS.index("gpt_neox")]
    src = no_native_dirs["gpt_neox"]
    twice = convert_checkpoint(convert_checkpoint(src, tmp_path / "g2", groups=2, progress=False), tmp_path / "g1",
                               groups=1, progress=False)
    record = read_config(twice)["gqa_conversion"]
    assert record["source_kv_heads"] == 2 and read_config(twice)["num_key_value_heads"] == 1
    once = convert_checkpoint(src, tmp_path / "once", groups=1, progress=False)
    torch.testing.assert_close(_logits(_load(family, twice), family), _logits(_load(family, once), family),
                               rtol=1e-5, atol=1e-5)


# Loads every converted directory with trust_remote_code in a process where gqa_toolkit cannot be imported.
_NO_TOOLKIT = textwrap.dedent("""
    import json, sys
    sys.modules["gqa_toolkit"] = None  # the venv has the toolkit installed: make sure this process cannot use it
    try:
        import gqa_toolkit
    except ImportError:
        pass
    else:
        raise SystemExit("gqa_toolkit imported")
    import torch, transformers
    report = {}
    for name, auto, out, inputs in json.loads(sys.argv[1]):
        model = getattr(transformers, auto).from_pretrained(out, trust_remote_code=True).eval()
        inputs = torch.load(inputs)
        with torch.no_grad():
            logits = model(**inputs).logits
            output = model(**inputs, use_cache=True)
            cache = output["cache"] if "cache" in output else output["past_key_values"]
        torch.save(logits, out + "/logits.pt")
        cache = getattr(cache, "self_attention_cache", cache)
        report[name] = [type(model).__module__, list(cache.layers[0].keys.shape)]
    assert not [m for m in sys.modules if m.startswith("gqa_toolkit") and sys.modules[m] is not None]
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_loads_with_trust_remote_code_without_the_toolkit(no_native_dirs, tmp_path):
    jobs, expected = [], {}
    for family in NO_NATIVE_FAMILIES:
        out = convert_checkpoint(no_native_dirs[family.model_type], tmp_path / family.model_type, groups=GROUPS,
                                 progress=False)
        torch.save(_inputs(family), tmp_path / f"{family.model_type}-inputs.pt")
        jobs.append([family.model_type, family.auto, str(out), str(tmp_path / f"{family.model_type}-inputs.pt")])
        model = _load(family, out)
        expected[family.model_type] = _logits(model, family)
        if family.model_type == "gpt_neox":  # a checkpoint saved by the toolkit-registered class (after uptraining)
            model.save_pretrained(tmp_path / "saved")
            assert (tmp_path / "saved" / "gqa_gpt_neox.py").is_file()
            jobs.append(["saved", family.auto, str(tmp_path / "saved"), jobs[-1][-1]])
            expected["saved"] = expected[family.model_type]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-I", "-c", _NO_TOOLKIT, json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == set(expected)
    for name, (module, cache_shape) in report.items():
        model_type = "gpt_neox" if name == "saved" else name
        shipped = spec_for(model_type).modeling.file.removesuffix(".py")  # the BART family shares gqa_bart.py
        assert module.startswith("transformers_modules.") and module.endswith(shipped), module
        assert cache_shape[1] == GROUPS
        logits = torch.load(tmp_path / name / "logits.pt")
        torch.testing.assert_close(logits, expected[name], rtol=0, atol=0)


def test_gpt2_xl_and_t5_11b_shaped_plans_on_meta():
    """Output shapes of the transposed fused layout and of T5's scopes, on the meta device with no memory."""
    from test_convert_meta import converted_shapes

    from gqa_toolkit.families.geometry import Geometry
    from gqa_toolkit.convert.io.tensors import SourceTensor
    from gqa_toolkit.convert.methods.unit import UnitConversion

    def plan(shapes, spec, geos, groups):
        sources = {n: SourceTensor(torch.bfloat16, s) for n, s in shapes.items()}
        read = lambda n: torch.empty(shapes[n], dtype=torch.bfloat16, device="meta")  # noqa: E731
        return converted_shapes(sources, read, spec, geos, groups, UnitConversion("mean"))

    d, hd = 1600, 64  # gpt2-xl: 48 layers, 25 heads
    gpt2 = {f"transformer.h.{i}.attn.c_attn.{p}": s for i in range(48)
            for p, s in (("weight", (d, 3 * d)), ("bias", (3 * d,)))}
    out = plan(gpt2, spec_for("gpt2"), Geometry(48, 25, 25, hd, 0.02), 5)
    assert out["transformer.h.47.attn.c_attn.weight"] == (d, (25 + 2 * 5) * hd)
    assert out["transformer.h.47.attn.c_attn.bias"] == ((25 + 2 * 5) * hd,)

    heads, d_kv, d_model = 128, 128, 1024  # t5-11b: 24 + 24 layers, inner dim 16384 != d_model
    t5 = {f"{stack}.block.{i}.layer.{j}.{att}.{p}.weight": (heads * d_kv, d_model) for i in range(24)
          for stack, j, att in (("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"),
                                ("decoder", 1, "EncDecAttention")) for p in "qkv"}
    spec, geo = spec_for("t5"), Geometry(24, heads, heads, d_kv, 0.02)
    out = plan(t5, spec, {kind: geo for kind in spec.kinds("decoder")}, 8)
    assert out["decoder.block.23.layer.1.EncDecAttention.v.weight"] == (8 * d_kv, d_model)
    assert out["decoder.block.23.layer.0.SelfAttention.q.weight"] == (heads * d_kv, d_model)
    assert out["encoder.block.23.layer.0.SelfAttention.k.weight"] == (heads * d_kv, d_model)
    out = plan(t5, spec, {kind: geo for kind in spec.kinds("all")}, 8)
    assert out["encoder.block.23.layer.0.SelfAttention.k.weight"] == (8 * d_kv, d_model)


@pytest.mark.parametrize("family", NO_NATIVE_FAMILIES, ids=NO_NATIVE_IDS)
def test_eager_attention_equals_sdpa(family, no_native_dirs, tmp_path):
    """sdpa shares each K/V head among its queries itself; the eager path repeats the heads first: same result."""
    out = convert_checkpoint(no_native_dirs[family.model_type], tmp_path / "out", groups=GROUPS, progress=False)
    skip_without_sdpa(family.auto, out)
    inputs = _inputs(family) if family.audio else _padded_inputs(family)
    with torch.no_grad():
        sdpa = _load(family, out, attn_implementation="sdpa")(**inputs).logits
        eager = _load(family, out, attn_implementation="eager")(**inputs).logits
    # padded positions attend to nothing, where the two kernels fill in different values: compare real tokens
    real = inputs["attention_mask"].bool() if not _seq2seq(family) else slice(None)
    torch.testing.assert_close(eager[real], sdpa[real], rtol=1e-5, atol=1e-5)
