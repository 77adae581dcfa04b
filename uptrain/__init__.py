"""Uptraining: a plain PyTorch loop on Accelerate that trains a converted checkpoint for a fraction of its original steps.

    from gqa_toolkit.uptrain import load_recipe, train
    train(load_recipe("recipes/tiny-uptrain.yaml", ["train.max_steps=20"]))
"""

from .errors import UptrainError
from .recipe import Recipe, load_recipe, validate_recipe


def train(recipe, **kwargs):
    """Run the uptraining loop (see `loop.train`) holding output.dir's lock; imported lazily so that recipe checks
    stay light."""
    from pathlib import Path

    from .loop import train as _train
    from .run_lock import run_lock

    if not isinstance(recipe, Recipe):
        raise UptrainError(f"train() takes a Recipe (from load_recipe or validate_recipe), not a "
                           f"{type(recipe).__name__}")
    with run_lock(Path(recipe.resolved().output.dir)):
        return _train(recipe, **kwargs)


__all__ = ["Recipe", "UptrainError", "load_recipe", "train", "validate_recipe"]
