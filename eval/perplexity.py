"""Held-out loss and perplexity, token-weighted over the predicted tokens of a held-out set (see heldout.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gqa_toolkit.uptrain.data import example_batches
from gqa_toolkit.uptrain.objective import predictions
from gqa_toolkit.uptrain.tasks import IGNORE


def batches(examples: dict[str, torch.Tensor], batch_size: int, device, progress: bool = False, desc: str = ""):
    """Consecutive slices of the examples (column -> (b, ...)), on `device`, with a progress bar."""
    total = -(-len(examples["input_ids"]) // batch_size)
    return tqdm(example_batches(examples, batch_size, device), total=total, desc=desc, disable=not progress)


@torch.no_grad()
def perplexity(model, examples: dict[str, torch.Tensor], batch_size: int = 8,
               progress: bool = False) -> dict[str, float]:
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches(examples, batch_size, model.device, progress, "perplexity"):
        logits, targets = predictions(model, batch)  # (B, T', V), (B, T')
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        tokens += int((targets != IGNORE).sum())
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
