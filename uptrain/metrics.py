"""Progress and logs: a progress bar (loss, lr, tokens/s), a JSONL metrics log, and the experiment trackers.

Only the main process writes. On resume, log lines past the restored step are dropped, so the log of a run that
was killed and resumed reads the same as the log of a run that never stopped. A disk fault while logging is a
one-line error and leaves no torn line behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from gqa_toolkit.disk import write_files

from .storage import disk_writes

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out: Path, *, is_main: bool, start_step: int, total_steps: int, progress: bool,
                 label: str = "uptrain", trackers: Callable[..., None] | None = None):
        self.is_main = is_main
        self.path = out / METRICS_FILE
        self.trackers = trackers  # accelerator.log (every process calls it; the trackers live on the main one)
        if is_main:
            self._truncate(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and progress),
                        desc=label, unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (step := _step(line)) is not None and step <= start_step]
        with disk_writes(self.path, "the metrics log", "output.dir"):
            write_files({self.path: "".join(line + "\n" for line in kept)})

    def log(self, step: int, metrics: dict) -> None:
        """Write one record for optimizer step `step` (1-based: the number of steps done)."""
        if self.trackers is not None:
            self.trackers({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if not self.is_main:
            return
        size = self.path.stat().st_size if self.path.exists() else 0

        def drop_torn_line() -> None:
            if self.path.exists():
                os.truncate(self.path, size)

        with disk_writes(self.path, "the metrics log", "output.dir", cleanup=drop_torn_line):
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def progress(self, steps: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.bar.update(steps)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _step(line: str) -> int | None:
    """The step of a log line; None for a torn line (a write cut short by SIGKILL) or a blank one."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
