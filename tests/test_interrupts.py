"""SIGTERM (a scheduler's kill) stops uptraining and the ablation with one line that says what was kept; a rerun
says where it resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import yaml

from test_eval_ablation import MICRO


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _terminate_when(proc: subprocess.Popen, ready, timeout: float = 120) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_while_uptraining_names_the_checkpoint_a_rerun_resumes_from(write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(train={"max_steps": 100_000}, output={"dir": str(out), "save_every": 2, "log_every": 1,
                                                                "eval_every": 100_000, "progress": True})
    checkpoints = out / "checkpoints"
    code, err = _terminate_when(_start("-m", "gqa_toolkit.uptrain", str(recipe)),
                                lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*[0-9]")))
    last = err.strip().splitlines()[-1]
    assert code == 143, err
    assert last.startswith("gqa-uptrain: interrupted; stopped at step ") and "of 100000" in last, last
    assert "is kept: rerun the same command to resume from it" in last and str(checkpoints) in last

    kept = sorted(checkpoints.glob("step-*[0-9]"))[-1]
    again = _start("-m", "gqa_toolkit.uptrain", str(recipe))
    code, err = _terminate_when(again, lambda: sorted(checkpoints.glob("step-*[0-9]"))[-1] != kept)
    assert code == 143, err
    assert f"resuming from step {int(kept.name.removeprefix('step-'))} of 100000" in err


@pytest.mark.slow
def test_sigterm_during_the_ablation_says_what_is_stored(tmp_path):
    recipe = tmp_path / "r.yaml"
    results = tmp_path / "results"
    recipe.write_text(yaml.safe_dump({**MICRO, "results_dir": str(results), "fractions": [0, 0.2, 0.4, 0.6],
                                      "data": {**MICRO["data"], "cache_dir": str(tmp_path / "cache")}}))
    code, err = _terminate_when(_start("-m", "gqa_toolkit.eval", "ablation", str(recipe)),
                                lambda: len(list((results / "cells").glob("*-g1-*.json"))) >= 1)
    last = err.strip().splitlines()[-1]
    assert code == 143, err
    assert last.startswith("gqa-eval: interrupted; ") and "finished cells are stored in" in last, last
    assert "stage 3/4" in err and "cell 1/" in err


@pytest.mark.slow
def test_sigterm_while_gqa_convert_writes_exits_143_and_leaves_nothing(uptrain_models, tmp_path):
    """The command's handler and the output folder's are one: SIGTERM during the write is reported as SIGTERM."""
    out = tmp_path / "out"
    proc = _start("-c", "from gqa_toolkit.convert.cli import main; main()", str(uptrain_models["mha"]), "--groups",
                  "2", "--method", "fit", "--calibration-samples", "4000", "--calibration-length", "64", "-o",
                  str(out))
    code, err = _terminate_when(proc, lambda: any(tmp_path.glob(".out.partial-*")))
    assert code == 143, err
    assert err.strip().splitlines()[-1].startswith("gqa-convert: interrupted; "), err
    assert list(tmp_path.iterdir()) == [], "nothing is left: no output and no partial folder"
