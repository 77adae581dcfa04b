"""Bad input gives one clear line (the problem and the fix), a non-zero exit, and leaves existing runs alone."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

from gqa_toolkit.uptrain.cli import main


def run_error(recipe, *overrides) -> str:
    result = CliRunner().invoke(main, [str(recipe), *overrides])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("gqa-uptrain: error: ")]
    assert len(lines) == 1 and result.output.strip().endswith(lines[0]), result.output
    return lines[0]


def snapshot(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make, expected", [
    (lambda d: None, "is missing"),
    (lambda d: d.mkdir(), "no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "holds no weights"),
])
def test_model_dir_that_is_not_a_checkpoint(write_recipe, tmp_path, make, expected):
    bad = tmp_path / "not-a-model"
    make(bad)
    line = run_error(write_recipe(model={"path": str(bad)}))
    assert expected in line and "model.path" in line
    assert not (tmp_path / "run").exists()


def test_dataset_path_that_does_not_exist(write_recipe, tmp_path):
    line = run_error(write_recipe(data={"source": str(tmp_path / "nope.jsonl")}))
    assert "does not exist" in line and "data.source" in line
    assert not (tmp_path / "run").exists()


def test_dataset_without_the_text_column(write_recipe, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"content": "x = 1\n" * 50, "id": i}) + "\n" for i in range(4)))
    line = run_error(write_recipe(data={"source": str(path), "max_documents": None}))
    assert "no text column 'text'" in line and "content" in line and "data.text_column" in line


def test_block_size_longer_than_the_context(write_recipe):
    line = run_error(write_recipe(data={"block_size": 512}))
    assert "data.block_size=512" in line and "256" in line


def test_batch_that_does_not_split_into_micro_batches(write_recipe):
    line = run_error(write_recipe(train={"batch_size": 5, "micro_batch_size": 2}))
    assert "train.batch_size=5" in line and "micro_batch_size" in line


def test_fraction_outside_range_and_missing_budget(write_recipe):
    assert "train.fraction" in run_error(write_recipe(train={"max_steps": None, "original_steps": 10,
                                                            "fraction": 1.5}))
    line = run_error(write_recipe(train={"max_steps": None}))
    assert "no way to compute the step budget" in line and "train.original_steps" in line


def test_distillation_without_a_recorded_teacher(write_recipe, uptrain_models, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(uptrain_models["gqa"], student)
    config = json.loads((student / "config.json").read_text())
    del config["gqa_conversion"]
    (student / "config.json").write_text(json.dumps(config))
    line = run_error(write_recipe(model={"path": str(student)}, objective={"distill_weight": 0.5}))
    assert "objective.teacher" in line


@pytest.mark.slow
def test_output_dir_holding_a_different_run_is_left_alone(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 2})
    assert CliRunner().invoke(main, [str(recipe)]).exit_code == 0
    before = snapshot(tmp_path / "run")
    line = run_error(recipe, "train.lr=0.1")
    assert "holds a different run" in line and "train.lr" in line
    assert snapshot(tmp_path / "run") == before

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "holds no uptrain run" in run_error(recipe, f"output.dir={tmp_path / 'other'}")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_learning_rate_that_can_only_diverge_is_refused_before_training(write_recipe, tmp_path):
    """lr=1e30 used to train until the loss was NaN; divergence itself is tests/test_reliability_uptrain3.py's."""
    recipe = write_recipe(train={"max_steps": 6, "lr": 1e30, "max_grad_norm": None}, output={"save_every": 1})
    line = run_error(recipe)
    assert "train.lr" in line and "less than or equal to 1" in line
    assert not (tmp_path / "run").exists()


def test_hub_dataset_that_cannot_be_loaded(write_recipe, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = run_error(write_recipe(data={"source": "someone/no-such-dataset"}))
    assert "could not load hub dataset 'someone/no-such-dataset'" in line and "data.source" in line
    assert not (tmp_path / "run").exists()
