"""The run directory (output.dir): where it may be, the saved recipe that claims it, and what cut-short saves leave.

A run writes only into a directory that is new, empty, or an earlier run of the same recipe (its
`uptrain_recipe.yaml` says so); never into, above or below a checkpoint or data folder it reads, and it never
deletes files it did not write.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from gqa_toolkit.disk import is_partial, partial_name, write_files
from gqa_toolkit.output_dir import listing

from .errors import UptrainError
from .recipe import Recipe, yaml_problem
from .storage import disk_writes

RECIPE_FILE = "uptrain_recipe.yaml"
MODEL_TMP = ".model.tmp"  # the final model is written here, then moved into output.dir
# What saves cut short by a full disk or SIGKILL leave behind (write_files stages files as `.NAME.partial-PID`).
PARTIAL_SAVES = (MODEL_TMP, partial_name(RECIPE_FILE, "*"), partial_name("metrics.jsonl", "*"),
                 "checkpoints/step-*.tmp")
# Keys that change only bookkeeping, never the weights: a resumed run may change them.
NEUTRAL_KEYS = {"output": {"save_every", "keep_last", "eval_every", "log_every", "trackers", "progress",
                           "progress_label", "push_to_hub", "private"},
                "data": {"cache_dir"}}


def _comparable(recipe: dict) -> dict:
    return {sec: {k: v for k, v in body.items() if k not in NEUTRAL_KEYS.get(sec, ())} for sec, body in recipe.items()}


def _differences(old: dict, new: dict) -> list[str]:
    old, new = _comparable(old), _comparable(new)
    return [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {new.get(sec, {}).get(k)!r}"
            for sec in sorted(set(old) | set(new))
            for k in sorted(set(old.get(sec, {})) | set(new.get(sec, {})))
            if old.get(sec, {}).get(k) != new.get(sec, {}).get(k)]


def check_destination(out: Path, protected: dict[str, Path]) -> None:
    """Refuse an output.dir that is, holds or sits inside a folder the run reads (role -> path)."""
    for role, path in protected.items():
        path = path.resolve()
        if out == path:
            where = "is"
        elif out in path.parents:
            where = "is a folder above"
        elif path in out.parents:
            where = "is inside"
        else:
            continue
        raise UptrainError(f"output.dir {out} {where} {role} {path}, which uptraining reads and never writes into; "
                           f"choose an output.dir outside it, e.g. {path.parent / (path.name + '-uptrained')}")


def _damaged(saved: Path, out: Path, problem: str) -> UptrainError:
    return UptrainError(f"{saved} {problem}, so output.dir cannot be checked as an earlier run of this recipe; "
                        f"restore that file, or choose a new output.dir (or delete {out} to start over)")


def _saved_recipe(saved: Path, out: Path) -> dict:
    """The recipe an earlier run saved in `out`, or a one-line error when the file is damaged."""
    try:
        raw = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _damaged(saved, out, f"is not valid YAML ({yaml_problem(e)})") from None
    if not (isinstance(raw, dict) and all(isinstance(body, dict) for body in raw.values())):
        raise _damaged(saved, out, "is not a mapping of recipe sections")
    return raw


def claim_run_dir(recipe: Recipe, protected: dict[str, Path]) -> Path:
    """Check that output.dir is new, empty, or holds this same run (to resume), and is none of the `protected`
    folders (role -> path) nor above or inside one; write nothing."""
    out = Path(recipe.output.dir)
    check_destination(out, protected)
    if out.exists() and not out.is_dir():
        raise UptrainError(f"output.dir {out} is a file; choose a directory")
    entries = [p for p in out.iterdir() if not is_partial(p, RECIPE_FILE)] if out.exists() else []
    if not entries:
        return out
    saved = out / RECIPE_FILE
    if not saved.is_file():
        raise UptrainError(f"output.dir {out} is not empty and holds no uptrain run ({RECIPE_FILE} is missing): it "
                           f"holds {listing(entries)}, which uptraining never overwrites; choose a new or empty "
                           "output.dir")
    diffs = _differences(_saved_recipe(saved, out), recipe.model_dump(mode="json"))
    if diffs:
        raise UptrainError(f"output.dir {out} holds a different run ({'; '.join(diffs[:3])}); choose a new "
                           f"output.dir, or delete it to start over")
    return out


def clear_partial_saves(out: Path) -> None:
    """Remove what saves cut short left in a claimed run dir (a rerun then resumes from the last complete
    checkpoint)."""
    for pattern in PARTIAL_SAVES:
        for partial in out.glob(pattern):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)


def write_recipe(out: Path, recipe: Recipe) -> None:
    """Save the resolved recipe, which claims `out`; a disk fault leaves no folder this call created."""
    created = not out.exists()

    def undo() -> None:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()

    with disk_writes(out / RECIPE_FILE, "the recipe", "output.dir", cleanup=undo):
        out.mkdir(parents=True, exist_ok=True)
        write_files({out / RECIPE_FILE: recipe.to_yaml()})
