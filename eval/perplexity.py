"""Held-out loss and perplexity, token-weighted over the predicted tokens of a held-out set (see heldout.py); the
same loss uptrain logs as `heldout_loss`."""

from __future__ import annotations

import math
from functools import partial

import torch
from tqdm.auto import tqdm

from gqa_toolkit.uptrain.data import example_batches
from gqa_toolkit.uptrain.objective import heldout_loss


def batches(examples: dict[str, torch.Tensor], batch_size: int, device, progress: bool = False, desc: str = ""):
    """Consecutive slices of the examples (column -> (b, ...)), on `device`, with a progress bar."""
    return _bar(examples, batch_size, progress, desc)(example_batches(examples, batch_size, device))


def _bar(examples: dict[str, torch.Tensor], batch_size: int, progress: bool, desc: str):
    total = -(-len(next(iter(examples.values()))) // batch_size)
    return partial(tqdm, total=total, desc=desc, disable=not progress)


def perplexity(model, examples: dict[str, torch.Tensor], batch_size: int = 8,
               progress: bool = False) -> dict[str, float]:
    loss, tokens = heldout_loss(model, examples, batch_size, model.device,
                                _bar(examples, batch_size, progress, "perplexity"))
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
