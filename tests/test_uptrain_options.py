"""Switches of the loop that must not change what it computes (or must still train): gradient checkpointing,
Adafactor, streaming data, bf16 mixed precision, a token budget."""

from __future__ import annotations

import json
import math

import pytest

from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.uptrain.metrics import read_metrics


def losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(write_recipe, tmp_path):
    plain = train(load_recipe(write_recipe("a.yaml", train={"max_steps": 3}, output={"dir": str(tmp_path / "a")})))
    ckpt = train(load_recipe(write_recipe("b.yaml", train={"max_steps": 3}, output={"dir": str(tmp_path / "b")},
                                          model={"gradient_checkpointing": True})))
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-5)
    assert json.loads((ckpt / "config.json").read_text())["num_key_value_heads"] == 2


@pytest.mark.slow
def test_adafactor_trains(write_recipe):
    out = train(load_recipe(write_recipe(train={"max_steps": 6, "optimizer": "adafactor", "lr": 1e-2,
                                                "schedule": "constant"})))
    held = [m["heldout_loss"] for m in read_metrics(out) if "heldout_loss" in m]
    assert held[-1] < held[0]


@pytest.mark.slow
def test_streaming_run_with_a_token_budget(write_recipe):
    # 3 steps of 4 x 64 tokens cover 700 tokens
    out = train(load_recipe(write_recipe(data={"streaming": True, "shuffle_buffer": 16},
                                         train={"max_steps": None, "max_tokens": 700})))
    record = json.loads((out / "config.json").read_text())["gqa_uptraining"]
    assert record["steps"] == 3 and record["tokens"] == 3 * 4 * 64
    assert len(losses(out)) == 3


@pytest.mark.slow
def test_bf16_mixed_precision_runs_on_cpu(write_recipe):
    out = train(load_recipe(write_recipe(train={"max_steps": 2, "precision": "bf16"})))
    assert all(math.isfinite(x) for x in losses(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # saved in the checkpoint's dtype
