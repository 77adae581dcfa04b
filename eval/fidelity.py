"""How much of the source model's function a converted model kept: per-token KL(source || converted) and top-1
agreement of the predictions on held-out examples (next tokens, or a decoder's targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqa_toolkit.uptrain.objective import predictions
from gqa_toolkit.uptrain.tasks import IGNORE

from .perplexity import batches


@torch.no_grad()
def fidelity(model, source, examples: dict[str, torch.Tensor], batch_size: int = 8,
             progress: bool = False) -> dict[str, float]:
    model.eval()
    source.eval()
    kl_sum, agree, tokens = 0.0, 0, 0
    for batch in batches(examples, batch_size, model.device, progress, "fidelity"):
        logits, targets = predictions(model, batch)  # (B, T', V), (B, T')
        keep = (targets != IGNORE).flatten()  # (B*T',)
        log_q = F.log_softmax(logits.flatten(0, 1)[keep].float(), dim=-1)  # (tokens, V)
        source_logits, _ = predictions(source, {k: v.to(source.device) for k, v in batch.items()})
        log_p = F.log_softmax(source_logits.flatten(0, 1)[keep.to(source.device)].float(), dim=-1).to(log_q.device)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        tokens += int(keep.sum())
    return {"kl": kl_sum / tokens, "top1_agreement": agree / tokens, "tokens": tokens}
