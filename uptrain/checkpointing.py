"""Training-state checkpoints in the run directory: saved atomically, resumed from, and only the last K kept.

    OUT/uptrain_recipe.yaml           the resolved recipe; a rerun with a different one is refused (run_dir.py)
    OUT/checkpoints/step-00000040/    accelerator.save_state + trainer_state.json (step, tokens)
    OUT/metrics.jsonl                 one line per logged step
    OUT/config.json, *.safetensors    the final model, written at the end
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from safetensors import SafetensorError

from .errors import UptrainError, first_line
from .storage import disk_writes

STATE_FILE = "trainer_state.json"
# what accelerate's load_state raises for a damaged checkpoint file (truncated zip, pickle or safetensors)
_UNREADABLE = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is a save that was cut short)."""
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if root.exists() else []


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(accelerator, out: Path, state: dict, keep_last: int) -> Path:
    """Save model, optimizer and RNG state of every process, atomically, then drop all but the last `keep_last`.
    A save cut short (disk full) is removed and named in a one-line error; the previous checkpoint stays."""
    final = out / "checkpoints" / f"step-{state['step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process

    def remove_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    with disk_writes(final, "checkpoint", "output.dir", cleanup=remove_tmp if main else None):
        if main:
            remove_tmp()
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    if main:
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _damaged(path: Path, problem: str) -> UptrainError:
    earlier = [c for c in checkpoints(path.parent.parent) if c.name < path.name]
    resume = f"resume from {earlier[-1].name}" if earlier else "start over"
    return UptrainError(f"checkpoint {path} {problem}; delete that folder to {resume}")


def read_trainer_state(path: Path) -> dict:
    """The trainer state (step, tokens, ...) of checkpoint `path`, or a one-line error naming the damaged file."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise _damaged(path, f"is incomplete: it has no {STATE_FILE}") from None
    except (ValueError, UnicodeDecodeError):
        raise _damaged(path, f"is damaged: {file} is not valid JSON") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("tokens"), int)):
        raise _damaged(path, f"is damaged: {file} does not hold the step and tokens")
    return state


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer and RNG state from `path`; returns its trainer state (step, tokens, ...)."""
    state = read_trainer_state(path)
    try:
        accelerator.load_state(str(path))
    except _UNREADABLE as e:
        raise _damaged(path, f"cannot be loaded ({first_line(e)})") from None
    return state
