"""Metrics against facts that hold exactly: a G = H mean conversion keeps the function (KL 0, full agreement),
the KV cache shrinks by exactly H/G, and perplexity is the exponential of the token-weighted loss."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.eval.cli import main
from gqa_toolkit.eval.fidelity import fidelity
from gqa_toolkit.eval.heldout import HELDOUT, heldout_set
from gqa_toolkit.eval.perplexity import perplexity
from gqa_toolkit.eval.speed import kv_cache_bytes_per_token, measure_speed
from conftest import toolkit_model as load_model, toolkit_tokenizer as load_tokenizer
from gqa_toolkit.uptrain.tasks import CausalLM


@pytest.fixture(scope="module")
def blocks(uptrain_models):
    data = HELDOUT.model_copy(update=dict(block_size=32, eval_blocks=6, cache_dir=str(uptrain_models["cache"])))
    return heldout_set(load_tokenizer(uptrain_models["mha"]), data, CausalLM(32))["input_ids"]


def test_fidelity_of_identity_conversion_is_exact(uptrain_models, blocks, tmp_path):
    out = convert_checkpoint(uptrain_models["mha"], tmp_path / "g4", method="mean", groups=4, progress=False)
    result = fidelity(load_model(out), load_model(uptrain_models["mha"]), {"input_ids": blocks})
    assert result["kl"] == 0.0 and result["top1_agreement"] == 1.0
    assert result["tokens"] == blocks.shape[0] * (blocks.shape[1] - 1)  # every position that predicts a next token


def test_fidelity_sees_a_real_conversion(uptrain_models, blocks, tmp_path):
    out = convert_checkpoint(uptrain_models["mha"], tmp_path / "g1", method="random", groups=1, progress=False)
    result = fidelity(load_model(out), load_model(uptrain_models["mha"]), {"input_ids": blocks})
    assert result["kl"] > 1e-4 and result["top1_agreement"] < 1.0


@pytest.mark.parametrize("groups", [1, 2])
def test_kv_cache_shrinks_by_exactly_h_over_g(uptrain_models, tmp_path, groups):
    out = convert_checkpoint(uptrain_models["mha"], tmp_path / "o", groups=groups, progress=False)
    source, converted = load_model(uptrain_models["mha"]), load_model(out)
    ratio = kv_cache_bytes_per_token(source) / kv_cache_bytes_per_token(converted)
    assert ratio == 4 / groups
    # 2 (K and V) x layers x G x head_dim x 4 bytes
    assert kv_cache_bytes_per_token(converted) == 2 * 2 * groups * 16 * 4


def test_speed_reports_positive_throughput(uptrain_models):
    point = measure_speed(load_model(uptrain_models["gqa"]), context=16, batch_size=2, decode_steps=3, repeats=1)
    assert point.prefill_tokens_per_s > 0 and point.decode_tokens_per_s > 0
    assert math.isclose(point.decode_tokens_per_s, 2 * 1000 / point.decode_ms_per_step)


def test_convert_json_reports_the_kv_cache_the_model_really_holds(uptrain_models, tmp_path):
    from gqa_toolkit.convert.cli import main as convert_main

    result = CliRunner().invoke(convert_main, [str(uptrain_models["mha"]), "--groups", "2", "-o", str(tmp_path / "g2"),
                                               "-q", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["kv_heads_before"], report["kv_heads_after"], report["output"]) == (4, 2, str(tmp_path / "g2"))
    # measured from the caches of a prefill, independently of the converter's arithmetic
    assert report["kv_cache_bytes_per_token_before"] == kv_cache_bytes_per_token(load_model(uptrain_models["mha"]))
    assert report["kv_cache_bytes_per_token_after"] == kv_cache_bytes_per_token(load_model(tmp_path / "g2"))
    assert report["kv_cache_saving"] == 0.5
    assert report["bytes_written"] == (tmp_path / "g2" / "model.safetensors").stat().st_size - \
        8 - int.from_bytes((tmp_path / "g2" / "model.safetensors").read_bytes()[:8], "little")


def test_speed_json_has_a_row_per_point_and_ratios_to_the_source(uptrain_models, tmp_path):
    out = convert_checkpoint(uptrain_models["mha"], tmp_path / "g1", groups=1, progress=False)
    result = CliRunner().invoke(main, ["speed", str(out), "--contexts", "16", "--batch-sizes", "1,2",
                                       "--decode-steps", "2", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted((r["model"], r["batch_size"], r["decode"]) for r in rows) == [
        (m, b, loop) for m in ("converted", "source") for b in (1, 2) for loop in ("dynamic", "static")]
    assert {(r["device"], r["attention"]) for r in rows} == {("cpu (%d threads)" % torch.get_num_threads(), "sdpa")}
    by = {(r["model"], r["batch_size"], r["decode"]): r for r in rows}
    for b, loop in [(1, "dynamic"), (2, "dynamic"), (1, "static"), (2, "static")]:
        converted, source = by["converted", b, loop], by["source", b, loop]
        assert source["decode_vs_source"] == 1.0
        assert converted["decode_vs_source"] == pytest.approx(converted["decode_tokens_per_s"]
                                                              / source["decode_tokens_per_s"])
        assert converted["kv_bytes_per_token"] * 4 == source["kv_bytes_per_token"]


def test_speed_names_a_model_without_a_conversion_record_as_a_model(uptrain_models):
    result = CliRunner().invoke(main, ["speed", str(uptrain_models["mha"]), "--contexts", "16", "--batch-sizes", "1",
                                       "--decode-steps", "1", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert [(r["model"], r["decode_vs_source"]) for r in json.loads(result.stdout)] == [("model", None)] * 2


def test_perplexity_is_exp_of_token_weighted_loss(uptrain_models, blocks):
    model = load_model(uptrain_models["mha"])
    result = perplexity(model, {"input_ids": blocks}, batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert result["tokens"] == blocks.shape[0] * (blocks.shape[1] - 1)


def test_cli_fidelity_uses_the_recorded_source(uptrain_models, tmp_path):
    out = convert_checkpoint(uptrain_models["mha"], tmp_path / "g4", groups=4, progress=False)
    result = CliRunner().invoke(main, ["fidelity", str(out), "--block-size", "32", "--max-blocks", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["kl"] == 0.0


@pytest.mark.parametrize("args, needle", [
    (["perplexity", "/no/such/dir"], "is missing"),
    (["perplexity", "{mha}", "--block-size", "4096"], "longer than the model's context"),
    (["perplexity", "{mha}", "--data", "{empty}", "--split", "train"], "gives no block of 256 tokens"),
    (["fidelity", "{mha}"], "records no conversion source"),
    # data problems name the option that chose the data, not the uptrain recipe's key
    (["perplexity", "{mha}", "--data", "/no/such/file.txt"], "does not exist; fix --data"),
    (["perplexity", "{mha}", "--split", "test"], "not 'test'; fix --split"),
    (["perplexity", "{mha}", "--text-column", "body"], "set --text-column to the one holding the texts"),
])
def test_cli_bad_input(uptrain_models, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("x")
    args = [a.format(mha=uptrain_models["mha"], empty=tmp_path / "empty.txt") for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in result.stderr


def test_speed_defaults_fit_a_short_context(no_native_dirs, tmp_path):
    """gptj's tiny config holds 128 positions: the default contexts shrink to what fits with the decode steps."""
    out = convert_checkpoint(no_native_dirs["gptj"], tmp_path / "g2", groups=2, progress=False)
    result = CliRunner().invoke(main, ["speed", str(out), "--batch-sizes", "1", "--decode-steps", "2",
                                       "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert {r["context"] for r in json.loads(result.stdout)} == {126}
