"""Held-out loss and perplexity of a causal LM, token-weighted over (N, T) blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    model.eval()
    total, tokens = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
        ids = blocks[start:start + batch_size].to(model.device)  # (B, T)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        targets = ids[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        tokens += targets.numel()
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
