"""The recipes shipped in the wheel (the repository's recipes/ folder, as the package gqa_toolkit.recipes): listed,
copied out to edit, and found by name when RECIPE is not a file, so an installed toolkit runs
`gqa-uptrain tiny-uptrain.yaml` as a checkout runs `gqa-uptrain recipes/tiny-uptrain.yaml`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gqa_toolkit import disk

from .errors import UptrainError

PACKAGE = "gqa_toolkit.recipes"


def _folder():
    return resources.files(PACKAGE)


def shipped() -> dict[str, str]:
    """Recipe file name -> its first line of description (the comment after the command it opens with)."""
    out = {}
    for entry in sorted(_folder().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out[entry.name] = _first_sentence(entry.read_text())
    return out


def _first_sentence(text: str) -> str:
    """The first sentence of the comment paragraph after the command line a recipe opens with."""
    comments = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")][1:]
    while comments and not comments[0]:
        comments.pop(0)
    paragraph = " ".join(comments[:comments.index("")] if "" in comments else comments)
    return paragraph.split(". ")[0].split(": ")[0].rstrip(".")


def _name(name: str) -> str:
    name = Path(name).name
    return name if name.endswith(".yaml") else f"{name}.yaml"


def _shipped(name: str):
    """The shipped recipe `name` (with or without .yaml, or as recipes/NAME), None if there is none."""
    entry = _folder() / _name(name)
    return entry if entry.is_file() else None


def resolve_recipe(path: str | Path) -> Path:
    """`path` when it is a file; else the shipped recipe of that name (installed as a plain file); else `path`,
    which the loader reports as missing."""
    entry = None if Path(path).is_file() else _shipped(str(path))
    return Path(str(entry)) if entry is not None else Path(path)


def copy_recipe(name: str, dest: str | Path | None) -> Path:
    """Write the shipped recipe `name` to `dest` (default: ./NAME.yaml); an existing file is never replaced."""
    entry = _shipped(name)
    if entry is None:
        raise UptrainError(f"no shipped recipe {name!r}; choose one of: {', '.join(shipped())} (gqa-uptrain --list)")
    target = Path(dest) if dest is not None else Path.cwd() / _name(name)
    if target.is_dir():
        target = target / _name(name)
    if target.exists():
        raise UptrainError(f"{target} exists; give another destination, or remove it first")
    try:
        disk.write_files({target: entry.read_text()})
    except OSError as exc:
        raise UptrainError(disk.write_fault_message(target, exc, "another destination")) from None
    return target
