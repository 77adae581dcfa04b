"""The training objective: cross-entropy on the task's targets, optionally mixed with distillation from the source
(MHA) model.

loss = (1 - w) * CE(student) + w * T^2 * KL(teacher_T || student_T), with both distributions softened by T, averaged
over the predicted tokens (positions whose target is IGNORE are skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .tasks import IGNORE


def predictions(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (b, T', V) and the targets (b, T') they predict. A batch with `labels` is an encoder-decoder's (the
    decoder predicts them position by position); otherwise each position of `input_ids` predicts the next."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    if "labels" in batch:
        return logits, batch["labels"]
    return logits[:, :-1], batch["input_ids"][:, 1:]


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the predicted tokens."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM; logits (b, T, V), ids (b, T)."""
    return ce_loss(logits[:, :-1], ids[:, 1:])


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per predicted token, on aligned logits (b, T', V); T^2 keeps gradient scale."""
    keep = (targets != IGNORE).flatten()  # (b*T',)
    s = F.log_softmax(student.flatten(0, 1)[keep].float() / temperature, dim=-1)  # (tokens, V)
    t = F.log_softmax(teacher.flatten(0, 1)[keep].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def objective(model, batch: dict[str, torch.Tensor], teacher=None, weight: float = 0.0,
              temperature: float = 1.0,
              teacher_batch: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise on one micro-batch, and its parts for logging (detached). `teacher_batch`: the same
    examples as the teacher takes them (default `batch`; the encoder's states may stand in for its inputs)."""
    logits, targets = predictions(model, batch)
    ce = ce_loss(logits, targets)
    if teacher is None or weight == 0.0:
        return ce, {"ce": ce.detach()}
    with torch.no_grad():
        teacher_logits, _ = predictions(teacher, batch if teacher_batch is None else teacher_batch)
    kd = distill_loss(logits, teacher_logits, targets, temperature)
    return (1.0 - weight) * ce + weight * kd, {"ce": ce.detach(), "kd": kd.detach()}


@torch.no_grad()
def heldout_loss(model, examples: dict[str, torch.Tensor], batch_size: int, device,
                 progress: Callable[[Iterable], Iterable] = iter) -> tuple[float, int]:
    """Mean cross-entropy over the predicted tokens of held-out examples (token-weighted across batches), and how
    many tokens that was; the model is left in eval mode. `progress` wraps the batches (a progress bar)."""
    from .data import example_batches

    model.eval()
    total, tokens = 0.0, 0
    for batch in progress(example_batches(examples, batch_size, device)):
        logits, targets = predictions(model, batch)  # (B, T', V), (B, T')
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        tokens += int((targets != IGNORE).sum())
    return total / tokens, tokens
