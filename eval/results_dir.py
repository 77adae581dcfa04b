"""The ablation's results_dir: a safe destination, claimed before any long work.

It is new, empty, or the results of this same recipe (to continue); never the original checkpoint, a folder above
it or inside it; never a folder of other files. Nothing in it that the ablation did not write is ever deleted.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

import yaml

from gqa_toolkit.errors import first_line
from gqa_toolkit.disk import is_partial
from gqa_toolkit.output_dir import listing

from .errors import EvalError
from .outputs import write_fault, write_files

RECIPE_FILE = "ablation-recipe.yaml"
DESTINATION = "another results_dir"


def check_apart_from_original(root: Path, original: str | None) -> None:
    """Refuse a results_dir that is the original checkpoint, holds it or sits inside it."""
    if original is None or not Path(original).expanduser().exists():  # built here, or a hub id
        return
    source = Path(original).expanduser().resolve()
    if root == source or root in source.parents:
        where = "is" if root == source else "holds"
        raise EvalError(f"results_dir {root} {where} the original checkpoint {source} (original.path); choose a "
                        f"results_dir outside it")
    if source in root.parents:
        raise EvalError(f"results_dir {root} is inside the original checkpoint {source} (original.path); choose "
                        f"a results_dir outside it")


def _saved_recipe(saved: Path):
    try:
        return yaml.safe_load(saved.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise EvalError(f"{saved} is not a readable ablation recipe ({first_line(exc)}); choose {DESTINATION}") \
            from None


def check_results_dir(root: Path, recipe_yaml: str) -> None:
    """The results dir is new, empty, or holds this same recipe (to continue); nothing is written."""
    if root.exists() and not root.is_dir():
        raise EvalError(f"results_dir {root} is a file; choose a folder path for results_dir")
    saved = root / RECIPE_FILE
    if saved.is_file():
        if _saved_recipe(saved) != yaml.safe_load(recipe_yaml):
            raise EvalError(f"{root} holds results of a different recipe ({saved}); choose {DESTINATION}, or "
                            f"delete it to start over")
    elif root.exists() and any(not is_partial(p) for p in root.iterdir()):
        raise EvalError(f"results_dir {root} is not empty and holds no ablation ({RECIPE_FILE} is missing): it has "
                        f"{listing(root.iterdir())}; choose a new or empty results_dir")


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_fault(path, exc, DESTINATION) from None


def claim_results_dir(root: Path, recipe_yaml: str) -> None:
    """Create the results dir with its recipe and cells/ folder. If that fails, the folders made here are removed
    again (rmdir: only while empty), so a rerun does not find a half-claimed, foreign-looking folder."""
    created = [p for p in (root / "cells", root, *root.parents) if not p.exists()]  # innermost first
    try:
        _mkdir(root)
        if not (root / RECIPE_FILE).is_file():
            write_files({root / RECIPE_FILE: recipe_yaml}, DESTINATION)
        _mkdir(root / "cells")
    except BaseException:
        for folder in created:
            with suppress(OSError):
                folder.rmdir()
        raise
