"""Uptraining for speech, end to end on CPU: a tiny whisper learns to transcribe synthetic tone speech (the MHA
source, trained with the same loop), is converted to 2 KV heads, which loses most of its transcripts, and
gqa-uptrain with distillation from the recorded source brings its KL to the source and its WER against the
source's transcripts back down; gqa-eval measures both. Two processes under `accelerate launch` follow the
one-process loss curve, as for text."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_uptrain_multiprocess import launch_two_processes

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.eval.cli import main as eval_main
from gqa_toolkit.uptrain import load_recipe, train, validate_recipe
from gqa_toolkit.uptrain.metrics import read_metrics
from conftest import toolkit_model as load_model
from gqa_toolkit.uptrain.tiny import build_tiny_whisper
from gqa_toolkit.uptrain.tones import write_tone_corpus

DATA = {"eval_blocks": 16, "target_length": 16}
TRAIN = {"batch_size": 16, "micro_batch_size": 16, "lr": 3e-3, "warmup_fraction": 0.0, "precision": "fp32"}


def _recipe(path, data_dir, cache, out, **sections) -> dict:
    recipe = {"model": {"path": str(path)}, "data": {"source": str(data_dir), "cache_dir": str(cache), **DATA},
              "train": dict(TRAIN), "output": {"dir": str(out), "progress": False, "trackers": [],
                                               "eval_every": 1000, "log_every": 1}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """{'data': tone clips, 'source': a tiny whisper trained to transcribe them, 'g2': its conversion}."""
    root = tmp_path_factory.mktemp("speech_uptrain")
    write_tone_corpus(root / "tones", count=96)
    init = build_tiny_whisper(root / "init")
    train(validate_recipe(_recipe(init, root / "tones", root / "cache", root / "source",
                                  model={"trainable": "all"}, train={"max_steps": 150, "warmup_fraction": 0.05})))
    g2 = convert_checkpoint(root / "source", root / "g2", groups=2, method="mean", progress=False)
    return {"root": root, "data": root / "tones", "cache": root / "cache", "source": root / "source", "g2": g2}


def _eval(command: str, model, data, *extra) -> dict:
    result = CliRunner().invoke(eval_main, [command, str(model), "--data", str(data), "--max-blocks", "16", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_uptraining_recovers_kl_and_wer_of_a_converted_whisper(speech, tmp_path):
    assert _eval("wer", speech["source"], speech["data"])["wer"] < 0.2  # the source transcribes the tones
    before_kl = _eval("fidelity", speech["g2"], speech["data"])["kl"]
    before = _eval("wer", speech["g2"], speech["data"])
    assert before["against"] == "source" and before["wer"] > 0.3  # conversion loses a third of the words or more

    out = train(validate_recipe(_recipe(speech["g2"], speech["data"], speech["cache"], tmp_path / "up",
                                        objective={"distill_weight": 0.5}, train={"max_steps": 40})))
    after_kl = _eval("fidelity", out, speech["data"], "--source", str(speech["source"]))["kl"]
    after = _eval("wer", out, speech["data"], "--source", str(speech["source"]))["wer"]
    assert after_kl < before_kl / 5 and after < before["wer"] / 3, (before_kl, after_kl, before["wer"], after)

    record = json.loads((out / "config.json").read_text())
    assert record["gqa_uptraining"]["objective"] == "speech+distill"
    assert record["gqa_uptraining"]["trainable"] == "converted"  # what auto means for a converted speech model
    assert record["gqa_uptraining"]["tokens"] == 40 * 16 * 16  # steps x clips x encoder positions
    assert (out / "preprocessor_config.json").is_file()
    # trainable auto is converted for speech: the audio encoder and the embeddings stay as they were
    trained, converted = load_model(out).state_dict(), load_model(speech["g2"]).state_dict()
    assert trained["model.encoder.conv1.weight"].equal(converted["model.encoder.conv1.weight"])
    assert not trained["model.decoder.layers.0.encoder_attn.k_proj.weight"].equal(
        converted["model.decoder.layers.0.encoder_attn.k_proj.weight"])


@pytest.mark.slow
def test_bf16_uptraining_distills_from_the_whisper_source(speech, tmp_path):
    """Mixed precision on the CPU: the source loads in bf16 and is handed float32 features; distillation runs and
    brings the KL down."""
    before_kl = _eval("fidelity", speech["g2"], speech["data"])["kl"]
    out = train(validate_recipe(_recipe(speech["g2"], speech["data"], speech["cache"], tmp_path / "up",
                                        objective={"distill_weight": 0.5},
                                        train={"max_steps": 15, "precision": "bf16"})))
    after_kl = _eval("fidelity", out, speech["data"], "--source", str(speech["source"]))["kl"]
    assert after_kl < before_kl / 2, (before_kl, after_kl)


@pytest.mark.slow
def test_perplexity_of_the_transcripts(speech):
    result = _eval("perplexity", speech["source"], speech["data"])
    assert result["loss"] < 1.0 and result["tokens"] > 16  # every clip's words and eos


@pytest.mark.slow
def test_two_processes_match_one_process_for_speech(speech, tmp_path):
    sections = dict(train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 4},
                    objective={"distill_weight": 0.5}, data={"eval_blocks": 4})
    for name in ("single", "double"):
        recipe = _recipe(speech["g2"], speech["data"], speech["cache"], tmp_path / name, **sections)
        (tmp_path / f"{name}.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    train(load_recipe(tmp_path / "single.yaml"))
    launch_two_processes(tmp_path / "double.yaml", port=29519)
    one = [m["loss"] for m in read_metrics(tmp_path / "single") if "loss" in m]
    two = [m["loss"] for m in read_metrics(tmp_path / "double") if "loss" in m]
    assert len(two) == 3 and two == pytest.approx(one, rel=1e-5)
