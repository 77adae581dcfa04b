"""Block-wise refinement: after the closed-form start, a converted attention unit is trained by gradient descent so
that the attention module's output (after softmax and O, with the family's own positions and masks) matches the
source's on the calibration activations.

The source's own attention module computes both sides: the target with the source's weights, the converted unit
with its K/V repeated back to the source's heads (a GQA head serving the query heads it replaced computes exactly
what the converted model computes), through `torch.func.functional_call`. So refinement runs on every family the
layer methods run on, with no attention code of its own, and holds one block and its calibration activations.
What is trained: the new K/V projections (G heads) and the compensating Q and O (and their biases).

With `bf16` the training steps run under bf16 autocast, the attention core (SDPA) in float32; the error that picks
the tensors kept is measured in float32. On SmolLM2-135M this halved refinement's time on a CPU with AVX512-BF16
and left the model's KL as it was (docs/real-checkpoints.md).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from gqa_toolkit.dtypes import computes_bf16

from ..errors import ConversionError
from .registry import REFINE_PRECISIONS

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
    bf16: bool = False  # training steps under bf16 autocast (the error that picks what is kept stays float32)


@dataclass(frozen=True)
class Refined:
    tensors: dict[str, torch.Tensor]  # on-disk name -> refined tensor (the output's shapes)
    error_before: float  # relative squared error of the attention output, ||y - y*||^2 / ||y*||^2
    error_after: float


def resolve_precision(precision: str, device: torch.device) -> str:
    """Refinement's precision made definite for `device` (auto: bf16 where it multiplies bf16 in hardware)."""
    if precision not in REFINE_PRECISIONS:
        raise ConversionError(f"unknown refine precision {precision!r}; choose one of: {', '.join(REFINE_PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if computes_bf16(device) else "fp32"


FLOAT32_SDPA = "gqa_toolkit_float32_sdpa"


def _sdpa_in_float32(module, *args, **kwargs):
    """transformers' SDPA attention with autocast off and every floating input in float32 (queries, keys, values,
    and what autocast made bf16 beside them: T5's position bias, additive masks); masks and causality as it decides."""
    def float32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    with torch.autocast(args[0].device.type, enabled=False):
        return sdpa_attention_forward(module, *map(float32, args), **{k: float32(v) for k, v in kwargs.items()})


AttentionInterface.register(FLOAT32_SDPA, _sdpa_in_float32)


@contextmanager
def _attention_core_in_float32(module: nn.Module, bf16: bool):
    """Under bf16 autocast, a stock module's SDPA runs in float32 while its projections run in bf16: CPU's bf16 SDPA
    backward took 2.3x float32's time, and the softmax keeps its precision. The module's config is shared with its
    block, so the implementation is put back on the way out."""
    config = getattr(module, "config", None)
    if not bf16 or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    config._attn_implementation = FLOAT32_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


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
    optimiser = torch.optim.Adam(groups, fused=True)
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
    device = targets[0].device.type
    with torch.enable_grad(), _attention_core_in_float32(module, settings.bf16):
        for step in range(1, settings.steps + 1):
            batch = train[(step - 1) % len(train)]
            with torch.autocast(device, dtype=torch.bfloat16, enabled=settings.bf16):
                predicted = outputs(batch)
            loss = (predicted.float() - targets[batch]).pow(2).sum() / scale
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step in checks and (now := error(held_out)) < best_error and math.isfinite(now):
                best, best_error = {n: t.detach().clone() for n, t in trained.items()}, now
    return Refined(best, before, best_error)
