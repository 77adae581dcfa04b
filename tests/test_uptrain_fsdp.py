"""Sharded uptraining with FSDP2 on two CPU processes over gloo, launched with the shipped recipe
(recipes/accelerate/fsdp.yaml) as a GPU node launches it, follows the one-process run.

accelerate turns FSDP on only for accelerator processes, so on CPU processes the loop shards with torch's
`fully_shard` itself (uptrain/sharding.py); these tests check that it really shards (every parameter a DTensor,
each process holding half, one checkpoint file per process) and that nothing else changes: the loss curve, the
gradient norm that clipping uses and the final weights match one process with the same global batch, with
distillation, clipping and gradient accumulation on, and a run killed after a checkpoint resumes to the same bits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.uptrain.metrics import read_metrics
from gqa_toolkit.uptrain.sharding import SHARDED_STATE

FSDP_CONFIG = Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
KILLED_AFTER_CHECKPOINT = Path(__file__).parent / "uptrain_killed_after_checkpoint.py"
HOLDING = re.compile(r"FSDP2 on CPU process (\d) of 2: (\d+) of (\d+) parameters are sharded DTensors; "
                     r"this process holds ([\d,]+) of their ([\d,]+) values")
# one process sums 4 micro-batch gradients, two processes sum 2 each and reduce-scatter: float rounding only
LOSS_RTOL, WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-6


def launch_fsdp(port: int, *script: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with the shipped FSDP2 config on two CPU processes (its num_processes and
    mixed_precision overridden as a user would on a small machine)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port), *script]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def uptrain_sharded(recipe: Path, port: int) -> subprocess.CompletedProcess:
    done = launch_fsdp(port, "-m", "gqa_toolkit.uptrain", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_really_sharded(stderr: str, checkpoint: Path) -> None:
    """Each process reports its DTensors' local shards; the sharded checkpoint holds one file per process and two
    chunks of every matrix."""
    from torch.distributed.checkpoint import FileSystemReader

    found = {int(m[0]): m for m in HOLDING.findall(stderr)}
    assert sorted(found) == [0, 1], stderr[-3000:]
    held = [int(m[3].replace(",", "")) for m in found.values()]
    total = int(found[0][4].replace(",", ""))
    for _, sharded, params, _, _ in found.values():
        assert sharded == params  # every parameter is a DTensor
    assert all(0 < h < total for h in held) and sum(held) == total  # each holds a part, together the whole

    files = sorted(p.name for p in (checkpoint / SHARDED_STATE).glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]
    metadata = FileSystemReader(str(checkpoint / SHARDED_STATE)).read_metadata().state_dict_metadata
    matrices = {k: v for k, v in metadata.items() if k.startswith("model.") and len(getattr(v, "size", ())) == 2}
    assert matrices and all(len(v.chunks) == 2 for v in matrices.values())


def curve(out: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in read_metrics(out) if key in m]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_model(ours: Path, theirs: Path, exact: bool = False) -> None:
    mine, reference = weights(ours), weights(theirs)
    assert mine.keys() == reference.keys() and mine
    for name, tensor in reference.items():
        if exact:
            assert torch.equal(mine[name], tensor), name
        else:
            torch.testing.assert_close(mine[name], tensor, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one_and_resumes_bit_identical(write_recipe, tmp_path):
    # llama (native GQA): distillation from the MHA source, clipping at a norm every step exceeds, and a global
    # batch of 16 in micro-batches of 4: two accumulation micro-steps per process, four in one process
    sections = dict(train={"max_steps": 4, "batch_size": 16, "micro_batch_size": 4, "precision": "fp32",
                           "max_grad_norm": 0.05},
                    objective={"distill_weight": 0.5}, data={"eval_blocks": 4})
    runs = {name: write_recipe(f"{name}.yaml", output={"dir": str(tmp_path / name), "save_every": 2}, **sections)
            for name in ("single", "sharded", "resumed")}
    train(load_recipe(runs["single"]))
    done = uptrain_sharded(runs["sharded"], port=29541)
    assert done.stderr.count("uptrained model written") == 1  # the main process saves the gathered weights
    assert_really_sharded(done.stderr, tmp_path / "sharded" / "checkpoints" / "step-00000004")

    one, two = curve(tmp_path / "single"), curve(tmp_path / "sharded")
    assert len(two) == 4 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    # the norm clipping used is the whole gradient's, not one shard's
    assert curve(tmp_path / "sharded", "grad_norm") == pytest.approx(curve(tmp_path / "single", "grad_norm"),
                                                                     rel=1e-4)
    assert min(curve(tmp_path / "single", "grad_norm")) > 0.05
    assert_same_model(tmp_path / "sharded", tmp_path / "single")

    killed = launch_fsdp(29542, str(KILLED_AFTER_CHECKPOINT), str(runs["resumed"]), "2")
    assert killed.returncode != 0
    assert not list((tmp_path / "resumed").glob("*.safetensors"))
    uptrain_sharded(runs["resumed"], port=29543)
    assert curve(tmp_path / "resumed")[-2:] == curve(tmp_path / "sharded")[-2:]
    assert_same_model(tmp_path / "resumed", tmp_path / "sharded", exact=True)


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one_for_the_toolkits_t5_modeling(write_t5_recipe, tmp_path):
    """T5 converted to MQA runs on the toolkit's own attention classes (AdamW: Adafactor is refused under FSDP2)."""
    sections = dict(train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 2, "precision": "fp32",
                           "optimizer": "adamw"},
                    data={"eval_blocks": 4}, objective={"distill_weight": 0.5})
    single = write_t5_recipe("single.yaml", output={"dir": str(tmp_path / "single")}, **sections)
    sharded = write_t5_recipe("sharded.yaml", output={"dir": str(tmp_path / "sharded")}, **sections)
    train(load_recipe(single))
    done = uptrain_sharded(sharded, port=29544)
    assert_really_sharded(done.stderr, tmp_path / "sharded" / "checkpoints" / "step-00000003")
    one, two = curve(tmp_path / "single"), curve(tmp_path / "sharded")
    assert len(two) == 3 and two == pytest.approx(one, rel=LOSS_RTOL)
    assert_same_model(tmp_path / "sharded", tmp_path / "single")


def test_adafactor_is_refused_under_fsdp2_in_one_line():
    from types import SimpleNamespace

    from gqa_toolkit.uptrain.errors import UptrainError
    from gqa_toolkit.uptrain.sharding import check_optimizer

    with pytest.raises(UptrainError, match="adafactor cannot step FSDP2's sharded parameters.*adamw"):
        check_optimizer(SimpleNamespace(is_fsdp2=True), "adafactor")
    check_optimizer(SimpleNamespace(is_fsdp2=False), "adafactor")  # DDP and one process: Adafactor runs


def test_cpu_processes_shard_only_as_the_toolkit_can(monkeypatch):
    """Which accelerator the loop gets: accelerate's own unless an FSDP launch put CPU processes in MULTI_CPU; FSDP1
    and other wrap policies are refused there in one line rather than run as something else."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from gqa_toolkit.uptrain.errors import UptrainError
    from gqa_toolkit.uptrain.sharding import CpuFsdp2, for_this_launch

    cpu, gpu = (SimpleNamespace(distributed_type=t) for t in (DistributedType.MULTI_CPU, DistributedType.FSDP))
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert for_this_launch(cpu) is cpu  # DDP on CPUs
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert for_this_launch(gpu) is gpu  # accelerate's own FSDP on GPUs
    assert isinstance(for_this_launch(cpu), CpuFsdp2)
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    with pytest.raises(UptrainError, match="fsdp_auto_wrap_policy is SIZE_BASED_WRAP.*TRANSFORMER_BASED_WRAP"):
        for_this_launch(cpu)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UptrainError, match="FSDP version 1.*fsdp_version: 2"):
        for_this_launch(cpu)
