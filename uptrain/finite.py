"""A checkpoint is saved only from finite weights, so "last good checkpoint" always names one that is."""

from __future__ import annotations

import torch

from .errors import UptrainError


def check_weights_finite(model: torch.nn.Module, accelerator, step: int, last_checkpoint) -> None:
    """Refuse to go on (and to save) once an optimizer step has made a weight NaN or Inf; every process learns it
    together (under FSDP each holds a shard), so none waits at the save for the others."""
    bad = torch.zeros(1, device=accelerator.device)
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 shard
        if not bool(torch.isfinite(local.detach()).all()):
            bad += 1
            break
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item():
        raise UptrainError(f"the weights are NaN or Inf after step {step}; stopped. Last good checkpoint: "
                           f"{last_checkpoint or 'none'}. Lower train.lr or raise train.warmup_fraction and use a "
                           "new output.dir")
