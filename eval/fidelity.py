"""How much of the source model's function a converted model kept: per-token KL(source || converted) and top-1
agreement of next-token predictions on held-out text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def fidelity(model, source, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    model.eval()
    source.eval()
    kl_sum, agree, tokens = 0.0, 0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="fidelity", disable=not progress):
        ids = blocks[start:start + batch_size]  # (B, T)
        log_q = F.log_softmax(model(input_ids=ids.to(model.device)).logits.float(), dim=-1)  # (B, T, V)
        log_p = F.log_softmax(source(input_ids=ids.to(source.device)).logits.float(), dim=-1).to(log_q.device)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        tokens += ids.numel()
    return {"kl": kl_sum / tokens, "top1_agreement": agree / tokens, "tokens": tokens}
