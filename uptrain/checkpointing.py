"""The run directory: the saved recipe that claims it, training-state checkpoints, resume, and keeping the last K.

    OUT/uptrain_recipe.yaml           the resolved recipe; a rerun with a different one is refused
    OUT/checkpoints/step-00000040/    accelerator.save_state + trainer_state.json (step, tokens)
    OUT/metrics.jsonl                 one line per logged step
    OUT/config.json, *.safetensors    the final model, written at the end
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .errors import UptrainError
from .recipe import Recipe

RECIPE_FILE = "uptrain_recipe.yaml"
STATE_FILE = "trainer_state.json"
# Keys that change only bookkeeping, never the weights: a resumed run may change them.
NEUTRAL_KEYS = {"output": {"save_every", "keep_last", "eval_every", "log_every", "tensorboard", "progress"},
                "data": {"cache_dir"}}


def _comparable(recipe: dict) -> dict:
    return {sec: {k: v for k, v in body.items() if k not in NEUTRAL_KEYS.get(sec, ())} for sec, body in recipe.items()}


def _differences(old: dict, new: dict) -> list[str]:
    old, new = _comparable(old), _comparable(new)
    return [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {new.get(sec, {}).get(k)!r}"
            for sec in sorted(set(old) | set(new))
            for k in sorted(set(old.get(sec, {})) | set(new.get(sec, {})))
            if old.get(sec, {}).get(k) != new.get(sec, {}).get(k)]


def claim_run_dir(recipe: Recipe) -> Path:
    """Check that output.dir is new, empty, or holds this same run (to resume); write nothing."""
    out = Path(recipe.output.dir)
    if out.exists() and not out.is_dir():
        raise UptrainError(f"output.dir {out} is a file; choose a directory")
    if not out.exists() or not any(out.iterdir()):
        return out
    saved = out / RECIPE_FILE
    if not saved.is_file():
        raise UptrainError(f"output.dir {out} is not empty and holds no uptrain run ({RECIPE_FILE} is missing); "
                           "choose a new output.dir")
    diffs = _differences(yaml.safe_load(saved.read_text()) or {}, recipe.model_dump(mode="json"))
    if diffs:
        raise UptrainError(f"output.dir {out} holds a different run ({'; '.join(diffs[:3])}); choose a new "
                           f"output.dir, or delete it to start over")
    return out


def write_recipe(out: Path, recipe: Recipe) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(recipe.to_yaml())


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is a save that was cut short)."""
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if root.exists() else []


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(accelerator, out: Path, state: dict, keep_last: int) -> Path:
    """Save model, optimizer and RNG state of every process, atomically, then drop all but the last `keep_last`."""
    final = out / "checkpoints" / f"step-{state['step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer and RNG state from `path`; returns its trainer state (step, tokens, ...)."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
