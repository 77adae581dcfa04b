"""Two real processes through `accelerate launch` (DDP over gloo on CPU) follow the one-process loss curve."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.uptrain.metrics import read_metrics


def launch_two_processes(recipe, port: int) -> subprocess.CompletedProcess:
    """`accelerate launch` of gqa-uptrain on two CPU processes (DDP over gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "gqa_toolkit.uptrain", str(recipe)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_match_one_process(write_recipe, tmp_path):
    # global batch 8: one process takes 2 micro-batches of 4 per step, each of two processes takes 1
    sections = dict(train={"max_steps": 4, "batch_size": 8, "micro_batch_size": 4}, data={"eval_blocks": 4})
    single = write_recipe("single.yaml", output={"dir": str(tmp_path / "single")}, **sections)
    double = write_recipe("double.yaml", output={"dir": str(tmp_path / "double")}, **sections)
    train(load_recipe(single))

    done = launch_two_processes(double, port=29517)
    assert done.stderr.count("uptrained model written") == 1  # printed by the main process only

    assert (tmp_path / "double" / "checkpoints" / "step-00000004" / "random_states_1.pkl").is_file()  # a 2nd rank

    one = [m["loss"] for m in read_metrics(tmp_path / "single") if "loss" in m]
    two = [m["loss"] for m in read_metrics(tmp_path / "double") if "loss" in m]
    assert len(two) == 4 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_process_for_t5_span_corruption(write_t5_recipe, tmp_path):
    """Span corruption draws its noise from (seed, step) over the whole global batch, so two processes see the
    same corrupted examples as one."""
    sections = dict(train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 4}, data={"eval_blocks": 4},
                    objective={"distill_weight": 0.5})
    single = write_t5_recipe("single.yaml", output={"dir": str(tmp_path / "single")}, **sections)
    double = write_t5_recipe("double.yaml", output={"dir": str(tmp_path / "double")}, **sections)
    train(load_recipe(single))

    launch_two_processes(double, port=29518)
    one = [m["loss"] for m in read_metrics(tmp_path / "single") if "loss" in m]
    two = [m["loss"] for m in read_metrics(tmp_path / "double") if "loss" in m]
    assert len(two) == 3 and two == pytest.approx(one, rel=1e-5)
