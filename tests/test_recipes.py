"""Every YAML recipe in recipes/ opens with the command that runs it and validates against its schema."""

import shlex
from pathlib import Path

import pytest

from gqa_toolkit.eval.ablation_recipe import load_ablation_recipe
from gqa_toolkit.uptrain import load_recipe, train

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def command_of(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} does not open with the command that runs it"
    return shlex.split(first[2:])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_its_command_and_validates(path):
    command = command_of(path)
    assert f"recipes/{path.name}" in command
    if command[:2] == ["gqa-eval", "ablation"]:
        recipe = load_ablation_recipe(path)
        assert recipe.methods and recipe.groups and recipe.fractions
    else:
        assert "gqa-uptrain" in command or "gqa_toolkit.uptrain" in command, command
        load_recipe(path)


def test_the_embedded_default_and_the_paper_recipe_ship():
    names = {p.name for p in RECIPES}
    assert {"tiny-ablation.yaml", "paper-t5-large.yaml", "llama-7b-fsdp-ablation.yaml"} <= names


@pytest.mark.slow
def test_tiny_t5_recipe_runs_as_its_comment_says(tmp_path, monkeypatch):
    """The commands in recipes/tiny-t5-uptrain.yaml's header, then the recipe itself (fewer steps)."""
    import json

    from click.testing import CliRunner

    from gqa_toolkit.convert.cli import main as convert_main
    from gqa_toolkit.uptrain.tiny import main as tiny_main

    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(tiny_main, ["--family", "t5", "--vocab-size", "600", "runs/tiny-t5"]).exit_code == 0
    converted = CliRunner().invoke(convert_main, ["runs/tiny-t5", "--groups", "1", "--method", "mean", "--output",
                                                  "runs/tiny-t5-mqa"])
    assert converted.exit_code == 0, converted.output
    recipe = Path(__file__).parent.parent / "recipes" / "tiny-t5-uptrain.yaml"
    out = train(load_recipe(recipe, ["train.fraction=0.002", "data.eval_blocks=4", "data.max_documents=60",
                                     f"data.cache_dir={tmp_path / 'cache'}", "output.progress=false"]))
    record = json.loads((out / "config.json").read_text())
    assert record["gqa_uptraining"]["objective"] == "span_corruption" and record["gqa_uptraining"]["steps"] == 4
    assert record["gqa_conversion"]["groups"] == 1 and record["model_type"] == "gqa_t5"


def test_shipped_recipes_copy_out_and_never_overwrite(tmp_path):
    from click.testing import CliRunner

    from gqa_toolkit.uptrain.cli import main as uptrain_main

    runner = CliRunner()
    copied = runner.invoke(uptrain_main, ["--copy", "tiny-uptrain", str(tmp_path)])
    assert copied.exit_code == 0, copied.output
    shipped = Path(__file__).parent.parent / "recipes" / "tiny-uptrain.yaml"
    assert (tmp_path / "tiny-uptrain.yaml").read_text() == shipped.read_text()
    again = runner.invoke(uptrain_main, ["--copy", "tiny-uptrain", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output
    unknown = runner.invoke(uptrain_main, ["--copy", "tiny-nothing"])
    assert unknown.exit_code == 2 and "tiny-uptrain.yaml" in unknown.output


def test_shipped_recipes_are_listed_with_their_first_sentence():
    from gqa_toolkit.uptrain.shipped_recipes import shipped

    about = shipped()
    assert about["tiny-uptrain.yaml"].startswith("Uptrains a tiny converted llama")
    assert about["tiny-uptrain.yaml"].endswith("on one CPU in about a minute")
    assert about["tiny-ablation.yaml"].endswith("with no download")


def test_private_without_a_repository_is_refused():
    from gqa_toolkit.uptrain.errors import UptrainError
    from gqa_toolkit.uptrain.recipe import validate_recipe

    with pytest.raises(UptrainError, match="private applies to output.push_to_hub"):
        validate_recipe({"model": {"path": "m"}, "train": {"max_steps": 1}, "output": {"dir": "o", "private": True}})


@pytest.mark.slow
def test_tiny_whisper_recipe_runs_as_its_comment_says(tmp_path, monkeypatch):
    """The commands in recipes/tiny-whisper-uptrain.yaml's header, the recipe itself (fewer steps), then the WER
    command it ends with."""
    import json

    from click.testing import CliRunner

    from gqa_toolkit.convert.cli import main as convert_main
    from gqa_toolkit.eval.cli import main as eval_main
    from gqa_toolkit.uptrain.tiny import main as tiny_main
    from gqa_toolkit.uptrain.tones import main as tones_main

    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(tiny_main, ["--family", "whisper", "runs/tiny-whisper"]).exit_code == 0
    assert CliRunner().invoke(tones_main, ["runs/tones", "--count", "40"]).exit_code == 0
    converted = CliRunner().invoke(convert_main, ["runs/tiny-whisper", "--groups", "2", "--method", "mean",
                                                  "--output", "runs/tiny-whisper-gqa2"])
    assert converted.exit_code == 0, converted.output
    recipe = Path(__file__).parent.parent / "recipes" / "tiny-whisper-uptrain.yaml"
    out = train(load_recipe(recipe, ["train.fraction=0.002", "data.eval_blocks=4",
                                     f"data.cache_dir={tmp_path / 'cache'}", "output.progress=false"]))
    record = json.loads((out / "config.json").read_text())
    assert record["gqa_uptraining"]["objective"] == "speech+distill" and record["gqa_uptraining"]["steps"] == 4
    assert record["gqa_conversion"]["groups"] == 2 and record["model_type"] == "gqa_whisper"
    measured = CliRunner().invoke(eval_main, ["wer", "runs/tiny-whisper-gqa2-uptrained", "--data", "runs/tones",
                                              "--max-blocks", "4"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout.strip().splitlines()[-1])["against"] == "source"
