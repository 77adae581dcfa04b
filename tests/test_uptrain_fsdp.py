"""Sharded uptraining through the shipped FSDP2 recipe (recipes/accelerate/fsdp.yaml) follows the one-process run.

accelerate turns FSDP on only for GPU processes (with ACCELERATE_USE_CPU it falls back to plain multi-CPU data
parallelism), so this runs on a machine with two GPUs and is skipped elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.uptrain.metrics import read_metrics

FSDP_CONFIG = Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                reason="accelerate runs FSDP on GPUs only; needs two")


@pytest.mark.slow
def test_fsdp2_two_gpus_match_one_process(write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    sections = dict(train={"max_steps": 4, "batch_size": 8, "micro_batch_size": 4, "precision": "fp32"},
                    data={"eval_blocks": 4})
    single = write_recipe("single.yaml", output={"dir": str(tmp_path / "single")}, **sections)
    sharded = write_recipe("sharded.yaml", output={"dir": str(tmp_path / "sharded")}, **sections)
    train(load_recipe(single))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29541",
           "-m", "gqa_toolkit.uptrain", str(sharded)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = [m["loss"] for m in read_metrics(tmp_path / "single") if "loss" in m]
    two = [m["loss"] for m in read_metrics(tmp_path / "sharded") if "loss" in m]
    assert len(two) == 4 and two == pytest.approx(one, rel=1e-4)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5)
