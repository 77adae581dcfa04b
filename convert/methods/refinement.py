"""Block-wise refinement: after the closed-form start, a converted attention unit is trained by gradient descent so
that the attention module's output (after softmax and O, with the family's own positions and masks) matches the
source's on the calibration activations.

The source's own attention module computes both sides: the target with the source's weights, the converted unit
with its K/V repeated back to the source's heads (a GQA head serving the query heads it replaced computes exactly
what the converted model computes), through `torch.func.functional_call`. So refinement runs on every family the
layer methods run on, with no attention code of its own, and holds one block and its calibration activations.
What is trained: the new K/V projections (G heads) and the compensating Q and O (and their biases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

Call = tuple[tuple, dict]  # the positional and keyword arguments the model handed the attention module, one batch


@dataclass(frozen=True)
class AttentionCalls:
    """One attention unit's module in the source's block (with the source's weights) and what it was handed."""

    module: nn.Module
    names: dict[str, str]  # the module's parameter name -> on-disk name
    calls: list[Call]


@dataclass(frozen=True)
class RefineSettings:
    steps: int
    lr: float  # Adam's step, relative to each tensor's RMS


@dataclass(frozen=True)
class Refined:
    tensors: dict[str, torch.Tensor]  # on-disk name -> refined tensor (the output's shapes)
    error_before: float  # relative squared error of the attention output, ||y - y*||^2 / ||y*||^2
    error_after: float


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def refine(converted: dict[str, torch.Tensor], attention: AttentionCalls, settings: RefineSettings,
           to_source: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Refined:
    """`converted`: the unit's tensors by on-disk name, as the output holds them; `to_source`: the same tensors
    shaped as the source's (K/V repeated to its heads), differentiably. With several calibration batches the last
    is held out: training never sees it, and the tensors kept (the start, or those of a checkpoint every fifth of
    the steps) are those with the lowest error on it, so refinement cannot make the unit worse by overfitting."""
    module, calls = attention.module, attention.calls
    fixed = {name: p.detach() for name, p in module.named_parameters()}
    with torch.no_grad():
        targets = [_first(module(*args, **kwargs)).float() for args, kwargs in calls]
    train = list(range(max(len(calls) - 1, 1)))
    held_out = [len(calls) - 1]
    trained = {name: t.detach().float().clone().requires_grad_(True) for name, t in converted.items()}
    groups = [{"params": [t], "lr": settings.lr * max(float(t.detach().pow(2).mean().sqrt()), 1e-8)}
              for t in trained.values()]
    optimiser = torch.optim.Adam(groups)
    # cosine decay to zero: the closed-form start is often close, and full-size late steps would undo the gain
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(settings.steps, 1))))

    def outputs(batch: int) -> torch.Tensor:
        shaped = to_source(trained)
        parameters = {**fixed, **{p: shaped[n].to(fixed[p].dtype) for p, n in attention.names.items() if n in shaped}}
        args, kwargs = calls[batch]
        return _first(functional_call(module, parameters, args, kwargs)).float()

    def error(batches: list[int]) -> float:
        with torch.no_grad():
            return sum(float((outputs(b) - targets[b]).pow(2).sum()) for b in batches) / \
                (sum(float(targets[b].pow(2).sum()) for b in batches) or 1.0)

    before = error(held_out)
    best, best_error = {n: t.detach().clone() for n, t in trained.items()}, before
    scale = sum(float(targets[b].pow(2).sum()) for b in train) / len(train) or 1.0
    checks = {max(1, round(settings.steps * i / 5)) for i in range(1, 6)}
    with torch.enable_grad():
        for step in range(1, settings.steps + 1):
            batch = train[(step - 1) % len(train)]
            loss = (outputs(batch) - targets[batch]).pow(2).sum() / scale
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step in checks and (now := error(held_out)) < best_error and math.isfinite(now):
                best, best_error = {n: t.detach().clone() for n, t in trained.items()}, now
    return Refined(best, before, best_error)
