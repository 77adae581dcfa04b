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
