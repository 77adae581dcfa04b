"""Downstream tasks through lm-eval-harness, an optional extra (`pip install 'gqa-toolkit[tasks]'`).

The model is loaded by the toolkit (its own families through the registered classes, on the evaluation device in
its precision) and handed to lm-eval's `HFLM` as a model object, so lm-eval neither picks a device nor runs a
folder's code. Tasks are lm-eval's own, the toolkit's shipped ones (`lm_tasks/`, no download) and the user's task
folders (`include_paths`: lm-eval YAML files, e.g. next to a local jsonl).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from .errors import EvalError

SHIPPED_TASKS = Path(__file__).parent / "lm_tasks"
INSTALL = "pip install 'gqa-toolkit[tasks]'"


def require_lm_eval(what: str = "gqa-eval tasks") -> None:
    """One line, before anything else is checked, when the extra is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(f"{what} needs lm-eval-harness, which is not installed; {INSTALL}") from None


def task_manager(names: list[str], include_paths: list[str] = (), role: str = "--include-path"):
    """lm-eval's task index over the shipped tasks, each folder of `include_paths` and, when `names` asks for one
    of them, lm-eval's own (indexing its thousands of task files takes a while); every name checked to be in it."""
    require_lm_eval()
    folders = [str(SHIPPED_TASKS)]
    for folder in include_paths:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise EvalError(f"{role} {folder} is not a folder; pass a folder of lm-eval task YAML files")
        folders.append(str(path.resolve()))
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices would bury the scores
    manager = TaskManager(include_path=folders, include_defaults=False)
    if any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=folders)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise EvalError(f"unknown task {unknown[0]!r}; {hint}name an lm-eval task, a shipped one "
                        f"({', '.join(shipped_task_names())}) or one in a folder given with {role}")
    return manager


def shipped_task_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_TASKS.glob("*.yaml"))


def run_tasks(model, tokenizer, names: list[str], manager, limit: int | None = None,
              batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of `model` (already on its device) on lm-eval tasks; `limit` examples per task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit, bootstrap_iters=0,
                              log_samples=False)
    return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's 'acc,none' and 'acc_stderr,none' as 'acc' and 'acc_stderr' (other filters keep their suffix)."""
    out = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)):  # alias, sample_len, 'N/A' stderr
            continue
        metric, _, filter_name = key.partition(",")
        out[metric if filter_name in ("", "none") else key] = float(value)
    return out


def headline(scores: dict[str, float]) -> tuple[str, float] | None:
    """The metric a table shows for a task: acc_norm, else acc, else the first that is not a stderr."""
    for name in ("acc_norm", "acc", *scores):
        if name in scores and not name.endswith("_stderr"):
            return name, scores[name]
    return None
