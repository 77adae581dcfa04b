"""The dependency direction README's layout promises: the kernel (gqa_toolkit/) <- convert <- uptrain <- eval."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"gqa_toolkit": ROOT / "gqa_toolkit", "convert": ROOT / "convert", "uptrain": ROOT / "uptrain",
          "eval": ROOT / "eval"}
ORDER = ["gqa_toolkit", "convert", "uptrain", "eval"]  # each may import only those before it


def imported_stages(folder: Path) -> dict[str, set[str]]:
    """stage -> the files of `folder` importing it (absolute imports of gqa_toolkit.<stage>)."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        if path.name == "moved.py":  # the old paths of moved modules, by design
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "gqa_toolkit" and len(parts) > 1 and parts[1] in STAGES:
                    found.setdefault(parts[1], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("stage", ORDER)
def test_each_stage_imports_only_the_stages_below_it(stage):
    later = ORDER[ORDER.index(stage) + 1:]
    wrong = {s: files for s, files in imported_stages(STAGES[stage]).items() if s in later}
    assert not wrong, f"{stage} imports {wrong}"
