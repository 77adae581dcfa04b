"""The step budget (alpha x original steps, max_steps or max_tokens), the batch split, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UptrainError
from .recipe import TrainSection


@dataclass(frozen=True)
class Budget:
    steps: int  # optimizer steps
    warmup_steps: int
    batch_size: int  # sequences per optimizer step, all processes together
    micro_batch_size: int  # sequences per forward pass on one process
    block_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


def plan_budget(cfg: TrainSection, block_size: int, num_processes: int) -> Budget:
    """Work out steps and gradient accumulation so that the global batch is the same on any number of processes."""
    per_micro_step = cfg.micro_batch_size * num_processes
    if cfg.batch_size % per_micro_step:
        raise UptrainError(
            f"train.batch_size={cfg.batch_size} is not a multiple of micro_batch_size x processes = "
            f"{cfg.micro_batch_size} x {num_processes}; change train.batch_size or train.micro_batch_size"
        )
    if cfg.max_steps is not None:
        steps = cfg.max_steps
    elif cfg.max_tokens is not None:
        steps = math.ceil(cfg.max_tokens / (cfg.batch_size * block_size))
    elif cfg.original_steps is not None:
        steps = max(1, round(cfg.fraction * cfg.original_steps))
    else:
        raise UptrainError("no way to compute the step budget: set train.original_steps, max_steps or max_tokens")
    return Budget(
        steps=steps,
        warmup_steps=round(cfg.warmup_fraction * steps),
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size,
        block_size=block_size,
    )


def lr_at(step: int, cfg: TrainSection, budget: Budget) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then decay to min_lr_ratio x lr."""
    if step < budget.warmup_steps:
        return cfg.lr * (step + 1) / budget.warmup_steps
    decay_steps = max(1, budget.steps - budget.warmup_steps)
    progress = min(1.0, (step - budget.warmup_steps) / decay_steps)
    if cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)
