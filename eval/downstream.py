"""Downstream tasks through lm-eval-harness, an optional extra (`pip install 'gqa-toolkit[tasks]'`)."""

from __future__ import annotations

from pathlib import Path

from .errors import EvalError


def run_tasks(model_dir: str, tasks: list[str], batch_size: int = 8, limit: int | None = None) -> dict:
    from gqa_toolkit.convert.io.model_dir import is_hub_id, resolve_model_dir

    if is_hub_id(model_dir):  # from the hub cache (or the network), as the other commands take it
        model_dir = str(resolve_model_dir(model_dir, error=EvalError, role="MODEL_DIR: "))
    if not (Path(model_dir) / "config.json").is_file():
        raise EvalError(f"MODEL_DIR {model_dir} is not a model directory (no config.json); pass a checkpoint folder")
    from gqa_toolkit.uptrain.model import check_text_model, load_config

    check_text_model(load_config(Path(model_dir), role="MODEL_DIR"))
    try:
        import lm_eval
    except ImportError:
        raise EvalError("lm-eval-harness is not installed; pip install 'gqa-toolkit[tasks]'") from None
    from gqa_toolkit.convert.families.loading import register_own_modeling, remote_code_allowed

    register_own_modeling(model_dir)  # lm-eval's from_pretrained then finds the toolkit's classes, not the folder's
    model_args = f"pretrained={Path(model_dir).resolve()},trust_remote_code={remote_code_allowed()}"
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, batch_size=batch_size,
                                      limit=limit)
    return results["results"]
