"""Recipes: every shipped recipe loads and validates; schema errors are reported all at once, one per line."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gqa_toolkit.uptrain import UptrainError, load_recipe, validate_recipe
from gqa_toolkit.uptrain.cli import main
from gqa_toolkit.uptrain.recipe import apply_overrides

ALL_RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _runs_uptrain(path: Path) -> bool:
    first = path.read_text().splitlines()[0]
    return first.startswith("# gqa-uptrain ") or "-m gqa_toolkit.uptrain " in first


RECIPES = [p for p in ALL_RECIPES if _runs_uptrain(p)]  # other stages' recipes (gqa-eval) are tested by theirs
MINIMAL = {"model": {"path": "m"}, "train": {"max_steps": 3}, "output": {"dir": "out"}}


def test_recipes_folder_is_not_empty():
    assert any(p.name == "tiny-uptrain.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_every_recipe_opens_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"recipes/{path.name}" in shlex.split(first[2:]), first


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_uptrain_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.resolved().output.dir.startswith("/")


def test_accelerate_configs_open_with_their_command():
    configs = sorted((Path(__file__).parent.parent / "recipes" / "accelerate").glob("*.yaml"))
    assert {p.name for p in configs} >= {"ddp.yaml", "fsdp.yaml"}
    for path in configs:
        assert f"--config_file recipes/accelerate/{path.name}" in path.read_text().splitlines()[0]
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_every_problem_is_reported_at_once_with_value_and_expectation():
    raw = {"model": {"pth": "m"}, "train": {"fraction": 1.5, "lr": "fast", "schedule": "step", "max_steps": 3},
           "output": {"dir": "out"}, "extra": 1}
    with pytest.raises(UptrainError) as err:
        validate_recipe(raw)
    lines = str(err.value).splitlines()
    assert "6 problems" in lines[0] and len(lines) == 7
    text = str(err.value)
    assert "model.path: missing" in text
    assert "model.pth: unknown key" in text and "extra: unknown key" in text
    assert "train.fraction" in text and "1.5" in text and "less than or equal to 1" in text
    assert "train.lr" in text and "'fast'" in text
    assert "train.schedule" in text and "'cosine'" in text and "'step'" in text


@pytest.mark.parametrize("train, message", [
    ({}, "no way to compute the step budget"),
    ({"fraction": 0.05}, "no way to compute the step budget"),
    ({"original_steps": 100, "max_steps": 5}, "only one of"),
    ({"original_steps": 100, "fraction": 0}, "greater than 0"),
    ({"original_steps": 100, "fraction": 1.01}, "less than or equal to 1"),
])
def test_budget_problems(train, message):
    with pytest.raises(UptrainError, match=message):
        validate_recipe({**MINIMAL, "train": train})


def test_dotted_overrides_parse_values_and_reject_unknown_keys():
    raw = apply_overrides(MINIMAL, ["train.lr=3e-4", "data.streaming=true", "objective.teacher=t"])
    recipe = validate_recipe(raw)
    assert recipe.train.lr == 3e-4 and recipe.data.streaming is True and recipe.objective.teacher == "t"
    assert MINIMAL["train"] == {"max_steps": 3}  # the input is not modified
    with pytest.raises(UptrainError, match="train.lrr: unknown key"):
        validate_recipe(apply_overrides(MINIMAL, ["train.lrr=1"]))
    with pytest.raises(UptrainError, match="not key=value"):
        apply_overrides(MINIMAL, ["train.lr"])


def test_recipes_are_frozen():
    recipe = validate_recipe(MINIMAL)
    with pytest.raises(Exception):
        recipe.train.lr = 1.0


def test_cli_reports_a_bad_recipe_in_lines_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {"max_steps": 3, "warmup": 10}}))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2
    assert "train.warmup: unknown key" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1

    result = CliRunner().invoke(main, [str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_prints_the_resolved_recipe_with_overrides(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    result = CliRunner().invoke(main, [str(path), "train.lr=0.5", "--print-recipe"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["train"]["lr"] == 0.5 and Path(printed["output"]["dir"]).is_absolute()
