"""gqa-uptrain against the third battery: recipes that hang a parser or a message, numbers that make training
diverge, data and checkpoints that used to end in a traceback, and two runs of one output.dir at once.

Every case exits 2 with one `gqa-uptrain: error:` line naming the problem, leaves the checkpoints it reads as they
were, and leaves output.dir as it was (absent, or unchanged).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_reliability_uptrain import invoke, one_error, snapshot

from gqa_toolkit.lock import exclusive
from gqa_toolkit.uptrain import UptrainError


@pytest.fixture
def recipe(write_recipe, tmp_path):
    """Fast runs: a small local jsonl, no held-out blocks, no trackers."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n" for i in range(20)))

    def write(**sections):
        data = {"source": str(docs), "max_documents": None, "eval_blocks": 0, **sections.pop("data", {})}
        output = {"trackers": [], **sections.pop("output", {})}
        return write_recipe(data=data, output=output, **sections)

    return write


def _refused(args, *needles, out: Path, max_seconds: float = 60) -> str:
    before = snapshot(out)
    started = time.monotonic()
    line = one_error(invoke(*args))
    assert time.monotonic() - started < max_seconds, "the refusal took too long"
    for needle in needles:
        assert needle in line, line
    assert snapshot(out) == before
    return line


def test_yaml_alias_bomb_is_refused_at_once(recipe, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text(recipe().read_text() + "\nbomb:\n" + "\n".join("  " + line for line in levels) + "\n")
    _refused([bomb], "expands to more than 100,000 values", "YAML aliases", out=tmp_path / "run", max_seconds=10)


def test_a_long_bad_value_is_quoted_in_part_of_a_line(recipe, tmp_path):
    line = _refused([recipe(), "train.lr=" + "[" + ", ".join(["1"] * 5000) + "]"], "train.lr", out=tmp_path / "run")
    assert len(line) < 300, line


def test_recipe_that_is_not_utf8(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model: {path: caf\xe9}\n")
    _refused([bad], "is not UTF-8 text", "save it as UTF-8", out=tmp_path / "run")


NUMBERS = {  # override -> needles
    "train.lr=.inf": ["train.lr"],
    "train.lr=1e30": ["train.lr", "less than or equal to 1"],
    "train.lr=.nan": ["train.lr"],
    "train.seed=-1": ["train.seed", "greater than or equal to 0"],
    f"train.seed={2**70}": ["train.seed", "less than 4294967296"],
    "train.betas=[0.9,2.0]": ["train.betas.1", "less than 1"],
    "train.weight_decay=.inf": ["train.weight_decay"],
    "objective.temperature=.nan": ["objective.temperature"],
}


@pytest.mark.parametrize("override", NUMBERS, ids=list(NUMBERS))
def test_numbers_out_of_range_are_refused_with_the_recipe(override, recipe, tmp_path):
    _refused([recipe(), override], *NUMBERS[override], out=tmp_path / "run")


def test_data_rows_that_are_not_text(recipe, tmp_path):
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(20)))
    _refused([recipe(data={"source": str(numbers)})], "text column 'text' holds int64 values, not text",
             "data.text_column", out=tmp_path / "run")


def test_latin1_data_names_the_file_and_the_fix(recipe, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 200)
    _refused([recipe(data={"source": str(latin)})], str(latin), "not UTF-8 text", out=tmp_path / "run")


def _copy_model(uptrain_models, tmp_path, name="model"):
    return shutil.copytree(uptrain_models["gqa"], tmp_path / name)


def test_config_whose_shapes_disagree_with_the_weights(recipe, uptrain_models, tmp_path):
    model = _copy_model(uptrain_models, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    _refused([recipe(model={"path": str(model)})], "do not fit its config.json", out=tmp_path / "run")


def test_checkpoint_without_its_untied_lm_head(recipe, uptrain_models, tmp_path):
    model = _copy_model(uptrain_models, tmp_path)
    weights = load_file(model / "model.safetensors")
    assert not json.loads((model / "config.json").read_text()).get("tie_word_embeddings", True) or \
        "lm_head.weight" in weights, "the tiny model ties its head: nothing to remove"
    weights.pop("lm_head.weight", None)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    _refused([recipe(model={"path": str(model)})], "lacks lm_head.weight", "start at random", out=tmp_path / "run")


def test_pickle_only_bin_checkpoint(recipe, uptrain_models, tmp_path):
    model = _copy_model(uptrain_models, tmp_path)
    (model / "model.safetensors").unlink()

    class Hostile:
        def __reduce__(self):
            return (print, ("ran",))

    state = {"lm_head.weight": torch.zeros(1), "hostile": Hostile()}
    torch.save(state, model / "pytorch_model.bin")
    _refused([recipe(model={"path": str(model)})], "unsafe unpickling", "safetensors", out=tmp_path / "run")


def test_a_second_run_of_one_output_dir_is_refused(recipe, tmp_path):
    out = tmp_path / "run"
    with exclusive(out, "held by the test", UptrainError):  # a run writing output.dir right now
        _refused([recipe()], "another gqa-uptrain is writing output.dir", "choose another output.dir", out=out)
    assert not out.exists()


@pytest.mark.slow
def test_divergence_never_names_a_non_finite_checkpoint_as_good(recipe, tmp_path, monkeypatch):
    """Weights made Inf by a step are caught before they are saved: the last good checkpoint is a finite one."""
    import gqa_toolkit.uptrain.loop as loop

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_blow_up(self, *args, **kwargs):  # step 3 makes every weight Inf, as lr=inf would
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_blow_up)
    out = tmp_path / "run"
    line = one_error(invoke(recipe(output={"save_every": 1}, train={"max_steps": 4})))
    assert "NaN or Inf after step 3" in line and "step-00000002" in line, line
    assert loop is not None
    for ckpt in (out / "checkpoints").iterdir():
        state = load_file(next(ckpt.rglob("*.safetensors")))
        assert all(torch.isfinite(t).all() for t in state.values()), ckpt
