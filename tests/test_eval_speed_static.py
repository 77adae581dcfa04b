"""The static-cache decode loop of `gqa-eval speed` computes what the dynamic one does: the same greedy tokens and
the same logits at every step, on a native llama and on the toolkit's own modeling (gpt2 and t5 converted to
GQA, whisper's encoder-decoder cache), so its speed figures measure the same work."""

import shutil

import pytest
import torch

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.eval.placement import load_for_eval
from gqa_toolkit.eval.speed import compiled_forward, context_inputs, decode_step, measure_speed, prefill, static_cache
from gqa_toolkit.families.transformers_names import output_cache

STEPS = 5


@torch.no_grad()
def greedy(model, decode: str, context: int = 12, batch_size: int = 2, forward=None) -> tuple[list, list]:
    """Greedy tokens and last-position logits of a prefill and STEPS decode steps, with a dynamic or static cache."""
    torch.manual_seed(0)
    inputs = context_inputs(model, batch_size, context)
    cache = static_cache(model, context, STEPS) if decode == "static" else None
    out, extra = prefill(model, inputs, cache=cache)
    tokens, logits = [], []
    for _ in range(STEPS + 1):
        logits.append(out.logits[:, -1])  # (B, V)
        tokens.append(out.logits[:, -1:].argmax(-1))  # (B, 1)
        if len(tokens) <= STEPS:
            out = decode_step(model, tokens[-1], output_cache(out), extra, forward)
    return tokens, logits


def _converted(no_native_dirs, tmp_path, family):
    return convert_checkpoint(no_native_dirs[family], tmp_path / family, groups=2, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "whisper"])
def test_static_cache_decodes_exactly_as_the_dynamic_one(family, family_dirs, no_native_dirs, tmp_path):
    model_dir = family_dirs["llama"] if family == "llama" else _converted(no_native_dirs, tmp_path, family)
    model = load_for_eval(model_dir)
    assert model.config.is_encoder_decoder == (family in ("t5", "whisper"))
    context = model.config.max_source_positions if family == "whisper" else 12
    dynamic, static = greedy(model, "dynamic", context), greedy(model, "static", context)
    for step, (a, b) in enumerate(zip(dynamic[0], static[0])):
        assert torch.equal(a, b), f"step {step}: tokens differ"
    for step, (a, b) in enumerate(zip(dynamic[1], static[1])):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"step {step}: logits differ")


def test_static_cache_holds_g_heads_preallocated(uptrain_models):
    model = load_for_eval(uptrain_models["gqa"])
    cache = static_cache(model, context=16, decode_steps=4)
    prefill(model, context_inputs(model, 2, 16), cache=cache)
    keys = cache.layers[0].keys
    assert keys.shape == (2, 2, 20, 16)  # (B, G, context + steps, hd): allocated once for the whole run


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
# torch's inductor touches torch.jit.script_method, which torch itself deprecates: not a transformers rename
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_static_step_decodes_as_the_dynamic_loop(uptrain_models):
    model = load_for_eval(uptrain_models["gqa"])
    compiled = greedy(model, "static", forward=compiled_forward(model))
    dynamic = greedy(model, "dynamic")
    assert all(torch.equal(a, b) for a, b in zip(dynamic[0], compiled[0]))
    for a, b in zip(dynamic[1], compiled[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    point = measure_speed(model, 12, 2, decode_steps=STEPS, repeats=1, decode="static+compile")  # compiled above
    assert point.decode == "static+compile" and point.decode_tokens_per_s > 0
