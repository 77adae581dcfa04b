"""Every YAML recipe in recipes/ opens with the command that runs it and validates against its schema."""

import shlex
from pathlib import Path

import pytest

from gqa_toolkit.eval.ablation_recipe import load_ablation_recipe
from gqa_toolkit.uptrain import load_recipe

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
