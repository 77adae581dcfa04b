"""Trackers go through accelerate's log_with: a named tracker that is not installed is one clear error before
anything is written, and every logged metric reaches the trackers as it reaches the JSONL log."""

from __future__ import annotations

import importlib.util

import pytest
from accelerate.tracking import GeneralTracker

from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.uptrain import loop as uptrain_loop
from gqa_toolkit.uptrain.errors import UptrainError
from gqa_toolkit.uptrain.metrics import read_metrics


class Recording(GeneralTracker):
    name = "recording"
    requires_logging_directory = False
    logged: list[tuple[int, dict]] = []

    def __init__(self):
        super().__init__()

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: int | None = None, **kwargs):
        Recording.logged.append((step, dict(values)))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_refused_before_writing(write_recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UptrainError, match=r"output.trackers names wandb, which is not installed; pip install wandb"):
        train(load_recipe(write_recipe(output={"dir": str(out), "trackers": ["wandb"]})))
    assert not out.exists()


def test_every_logged_metric_reaches_the_trackers(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(uptrain_loop, "resolve_trackers", lambda names: [Recording()])
    Recording.logged = []
    out = train(load_recipe(write_recipe(output={"dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 2})))
    numeric = [(r["step"], {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
               for r in read_metrics(out)]
    assert Recording.logged == numeric and len(numeric) >= 4
