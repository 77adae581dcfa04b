"""End-to-end uptraining of a tiny converted llama on CPU: loss falls, output reloads, resume, trainable subsets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.uptrain.metrics import read_metrics


def _weights(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_uptrain_lowers_heldout_loss_and_reloads(write_recipe, uptrain_models):
    recipe = load_recipe(write_recipe(train={"max_steps": 8, "batch_size": 8, "micro_batch_size": 4}))
    out = train(recipe)

    metrics = read_metrics(out)
    held = [m["heldout_loss"] for m in metrics if "heldout_loss" in m]
    assert held[-1] < held[0] - 0.1, held
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 9))

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # (G*hd, d)
    config = json.loads((out / "config.json").read_text())
    assert config["gqa_conversion"]["groups"] == 2
    record = config["gqa_uptraining"]
    assert record["steps"] == 8 and record["tokens"] == 8 * 8 * 64
    assert record["final_loss"] == pytest.approx(metrics[-1]["loss"])
    assert (out / "uptrain_recipe.yaml").is_file()
    card = (out / "README.md").read_text()
    assert card.startswith("# tiny-gqa") and "## Uptraining" in card
    assert not list(out.glob("*.bin"))


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(write_recipe, tmp_path):
    whole = load_recipe(write_recipe("whole.yaml", train={"max_steps": 6}, output={"dir": str(tmp_path / "whole")}))
    train(whole)

    path = write_recipe("cut.yaml", train={"max_steps": 6}, output={"dir": str(tmp_path / "cut")})
    assert train(load_recipe(path), stop_after=3) is None  # as if killed during step 4, after checkpoint 2
    cut = tmp_path / "cut"
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (cut / "model.safetensors").exists()
    train(load_recipe(path))  # the same command again: resumes from step 2

    a, b = _weights(tmp_path / "whole"), _weights(cut)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    losses_a = [m["loss"] for m in read_metrics(tmp_path / "whole") if "loss" in m]
    losses_b = [m["loss"] for m in read_metrics(cut) if "loss" in m]
    assert len(losses_b) == 6
    assert losses_b == pytest.approx(losses_a, rel=1e-6)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


@pytest.mark.slow
@pytest.mark.parametrize("trainable, changes", [("kv", ("k_proj", "v_proj")),
                                                 ("attention", ("q_proj", "k_proj", "v_proj", "o_proj"))])
def test_trainable_subset_changes_only_its_tensors(write_recipe, uptrain_models, trainable, changes):
    out = train(load_recipe(write_recipe(model={"trainable": trainable}, train={"max_steps": 2})))
    before, after = _weights(uptrain_models["gqa"]), _weights(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {name for name in before if any(f"self_attn.{part}." in name for part in changes)}
    assert changed == expected


@pytest.mark.slow
def test_distillation_from_the_recorded_source(write_recipe):
    out = train(load_recipe(write_recipe(objective={"distill_weight": 0.5, "temperature": 2.0},
                                         train={"max_steps": 2})))
    steps = [m for m in read_metrics(out) if "loss" in m]
    for m in steps:
        assert m["kd"] > 0  # the mean-pooled student is not the teacher
        assert m["loss"] == pytest.approx(0.5 * m["ce"] + 0.5 * m["kd"], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["gqa_uptraining"]["objective"] == "causal_lm+distill"


@pytest.mark.slow
def test_uptrains_the_output_of_gqa_convert(write_recipe, uptrain_models, tmp_path):
    from gqa_toolkit.convert import convert_checkpoint

    converted = convert_checkpoint(uptrain_models["mha"], tmp_path / "converted", method="mean", groups=1,
                                   progress=False)
    out = train(load_recipe(write_recipe(model={"path": str(converted)}, train={"max_steps": 2},
                                         objective={"distill_weight": 0.5})))  # teacher: the recorded source
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["gqa_conversion"]["groups"] == 1
    assert config["gqa_uptraining"]["steps"] == 2
    from gqa_toolkit.convert.provenance import NOT_UPTRAINED, UPTRAINING_SECTION

    converted_card, card = (converted / "README.md").read_text(), (out / "README.md").read_text()
    kept = converted_card[:converted_card.index(UPTRAINING_SECTION)]
    assert card.startswith(kept) and NOT_UPTRAINED in converted_card and NOT_UPTRAINED not in card
    assert "Uptrained with gqa-toolkit" in card and "2 steps" in card
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


@pytest.mark.slow
def test_uptrains_a_family_that_needs_the_toolkits_modeling_code(write_recipe, uptrain_models, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from gqa_toolkit.convert import convert_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(uptrain_models["mha"])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=len(tokenizer),
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    converted = convert_checkpoint(tmp_path / "gpt2", tmp_path / "gpt2-gqa", method="mean", groups=2,
                                   progress=False)
    out = train(load_recipe(write_recipe(model={"path": str(converted), "trainable": "attention"},
                                         train={"max_steps": 2})))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.num_key_value_heads == 2
    assert json.loads((out / "config.json").read_text())["gqa_uptraining"]["steps"] == 2


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(write_recipe, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    reference = train(load_recipe(write_recipe("ref.yaml", train={"max_steps": 10},
                                               output={"save_every": 2, "dir": str(tmp_path / "ref")})))
    path = write_recipe("killed.yaml", train={"max_steps": 10}, output={"save_every": 2})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gqa_toolkit.uptrain", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step-00000002").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists()  # it really died mid-run

    train(load_recipe(path))
    a, b = _weights(reference), _weights(run)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert [m["loss"] for m in read_metrics(run) if "loss" in m] == pytest.approx(
        [m["loss"] for m in read_metrics(reference) if "loss" in m], rel=1e-6)
