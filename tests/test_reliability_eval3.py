"""gqa-eval against the third battery: figures that used to come out silently wrong (a head started at random, an
encoder scored as a causal LM, KL against an unrelated --source) and inputs that used to end in a traceback.

Every case exits 2 with one `gqa-eval: error:` line naming the problem, and leaves its inputs as they were.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_reliability_eval import assert_refused, invoke

from conftest import toolkit_tokenizer as load_tokenizer

FAST = ["--block-size", "16", "--max-blocks", "1", "--batch-size", "1"]


@pytest.fixture
def models(uptrain_models, tmp_path):
    """The session's tiny MHA and GQA llamas, and damaged or unrelated neighbours of them."""
    no_head = shutil.copytree(uptrain_models["mha"], tmp_path / "no-head")
    weights = load_file(no_head / "model.safetensors")
    assert "lm_head.weight" in weights, "the tiny model ties its head: nothing to remove"
    del weights["lm_head.weight"]
    save_file(weights, no_head / "model.safetensors", metadata={"format": "pt"})

    wider = shutil.copytree(uptrain_models["mha"], tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))

    unrelated = tmp_path / "unrelated"  # same vocabulary, other shapes: not what the GQA model came from
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**{**config, "num_hidden_layers": config["num_hidden_layers"] + 1})
                     ).save_pretrained(unrelated)
    load_tokenizer(uptrain_models["mha"]).save_pretrained(unrelated)

    texts = tmp_path / "numbers.jsonl"
    texts.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(20)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 200)
    number = tmp_path / "number.json"
    number.write_text("42")
    return {"mha": uptrain_models["mha"], "gqa": uptrain_models["gqa"], "no_head": no_head, "wider": wider,
            "unrelated": unrelated, "numbers": texts, "latin": latin, "number": number, "tmp": tmp_path}


@pytest.fixture
def bert_dir(uptrain_models, tmp_path):
    """An encoder with a causal-LM head class in transformers: it sees every token of the block."""
    from transformers import BertConfig, BertLMHeadModel

    tokenizer = load_tokenizer(uptrain_models["mha"])
    torch.manual_seed(0)
    BertLMHeadModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
                    ).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


CASES = {
    "perplexity: checkpoint without its untied lm_head": (["perplexity", "{no_head}", *FAST],
                                                          ["lacks lm_head.weight", "start at random"]),
    "perplexity: config shapes disagree with the weights": (["perplexity", "{wider}", *FAST],
                                                            ["do not fit its config.json"]),
    "fidelity: --source an unrelated model of the same vocabulary": (
        ["fidelity", "{gqa}", "--source", "{unrelated}", *FAST],
        ["num_hidden_layers", "not the checkpoint MODEL_DIR was converted from"]),
    "perplexity: rows that are not text": (["perplexity", "{mha}", "--data", "{numbers}", "--split", "train", *FAST],
                                           ["holds int64 values, not text", "--text-column"]),
    "perplexity: Latin-1 text": (["perplexity", "{mha}", "--data", "{latin}", "--split", "train", *FAST],
                                 ["latin.txt", "not UTF-8 text"]),
    "perplexity: a JSON file that is a bare number": (["perplexity", "{mha}", "--data", "{number}", "--split",
                                                       "train", *FAST], ["number.json"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_error_line(case, models):
    args, needles = CASES[case]
    args = [a.format(**models) for a in args]
    assert_refused(args, needles, models["mha"], models["gqa"], models["no_head"], models["wider"])


def test_perplexity_of_an_encoder_is_refused(bert_dir):
    assert_refused(["perplexity", bert_dir, *FAST], ["sees the tokens after each position", "not a causal"],
                   bert_dir)


def test_perplexity_of_a_decoder_still_runs(models):
    code, err = invoke(["perplexity", models["mha"], *FAST])
    assert code == 0, err


@pytest.mark.parametrize("value, needles", [("bogus", ["GQA_EVAL_DEVICE 'bogus'", "unset it"]),
                                            ("meta", ["GQA_EVAL_DEVICE 'meta'"])])
def test_eval_device_variable_is_checked(value, needles, models, monkeypatch):
    monkeypatch.setenv("GQA_EVAL_DEVICE", value)
    assert_refused(["perplexity", models["mha"], *FAST], needles, models["mha"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_eval_device_cuda_without_a_gpu(models, monkeypatch):
    monkeypatch.setenv("GQA_EVAL_DEVICE", "cuda")
    assert_refused(["perplexity", models["mha"], *FAST], ["no CUDA GPU", "GQA_EVAL_DEVICE"], models["mha"])


def test_fidelity_warns_when_source_is_not_the_recorded_one(models, tmp_path):
    copy = shutil.copytree(models["mha"], tmp_path / "mha-copy")
    gqa = shutil.copytree(models["gqa"], tmp_path / "gqa-recorded")
    config = json.loads((gqa / "config.json").read_text())
    config.setdefault("gqa_conversion", {})["source"] = str(models["mha"])
    (gqa / "config.json").write_text(json.dumps(config))
    code, err = invoke(["fidelity", gqa, "--source", copy, *FAST])
    assert code == 0, err
    assert "gqa-eval: warning: --source" in err and "is not the source recorded" in err, err


def test_decode_steps_alone_past_the_context(models):
    assert_refused(["speed", models["gqa"], "--contexts", "16", "--decode-steps", "100000"],
                   ["100000 decode steps alone are past the model's context", "at most"], models["gqa"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["{mha}", "org/name"], ids=["local data", "hub id"])
def test_hf_home_that_is_a_file_is_named(model, models, tmp_path):
    """HF_HOME is read when datasets and huggingface_hub are imported: a fresh process."""
    import os
    import subprocess
    import sys

    (tmp_path / "hf-file").write_text("not a folder\n")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "def f(x):\n    return x\n" * 8}) + "\n" for _ in range(20)))
    script = shutil.which("gqa-eval", path=os.path.dirname(sys.executable))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-file"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([script, "perplexity", model.format(**models), "--data", str(docs), "--split", "train",
                           *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("gqa-eval: error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot use the Hugging Face cache" in done.stderr and "set HF_HOME" in done.stderr, done.stderr


def test_tasks_on_a_cached_hub_id_reaches_the_lm_eval_check(models, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval-harness is installed: the command would run the tasks")
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("c" * 40)
    shutil.copytree(models["mha"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_refused(["tasks", "org/tiny", "--tasks", "hellaswag"], ["lm-eval-harness is not installed"], snapshot)


def test_pickle_only_bin_in_eval(models, tmp_path):
    model = shutil.copytree(models["mha"], tmp_path / "pickled")
    (model / "model.safetensors").unlink()

    class Hostile:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"hostile": Hostile()}, model / "pytorch_model.bin")
    assert_refused(["perplexity", model, *FAST], ["unsafe unpickling", "safetensors"], model)
