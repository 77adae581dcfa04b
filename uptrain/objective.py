"""The training objective: causal LM cross-entropy, optionally mixed with distillation from the source (MHA) model.

loss = (1 - w) * CE(student) + w * T^2 * KL(teacher_T || student_T), with both distributions softened by T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (b, T, V), ids (b, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())  # (b*(T-1), V) vs (b*(T-1),)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per predicted token, on logits (b, T, V); the T^2 keeps gradient scale."""
    s = F.log_softmax(student[:, :-1].flatten(0, 1).float() / temperature, dim=-1)  # (b*(T-1), V)
    t = F.log_softmax(teacher[:, :-1].flatten(0, 1).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def objective(model, ids: torch.Tensor, teacher=None, weight: float = 0.0,
              temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise on one micro-batch (b, T), and its parts for logging (detached)."""
    logits = model(input_ids=ids).logits  # (b, T, V)
    ce = lm_loss(logits, ids)
    if teacher is None or weight == 0.0:
        return ce, {"ce": ce.detach()}
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    kd = distill_loss(logits, teacher_logits, temperature)
    return (1.0 - weight) * ce + weight * kd, {"ce": ce.detach(), "kd": kd.detach()}
