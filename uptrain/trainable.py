"""Which parameters train (`all`, `attention`, `converted` or `kv`), and the optimizer over them (AdamW or
Adafactor)."""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import UptrainError
from .recipe import TrainSection


def _spec(model_type: str, which: str):
    from gqa_toolkit.errors import ConversionError
    from gqa_toolkit.families.spec import spec_for

    try:
        return spec_for(model_type)
    except ConversionError as e:
        raise UptrainError(f"trainable: {which} needs to know where attention lives: {e}; use trainable: all") from None


def conversion_kinds(config) -> list[str] | None:
    """The attention kinds gqa-convert changed, from the record in the model's config.json; None without one."""
    from gqa_toolkit.records import CONVERSION_KEY

    record = getattr(config, CONVERSION_KEY, None)
    return list(record.get("attention_kinds", [])) if isinstance(record, dict) else None


def _patterns(config, which: str) -> list[re.Pattern[str]]:
    """Regexes for the parameters that train: the attention modules (all of them, or those of the kinds the
    conversion changed), or the converted K/V tensors (and their norms), from the family's spec."""
    from gqa_toolkit.families.spec import key_pattern

    model_type = config.model_type
    spec = _spec(model_type, which)
    if which == "attention":
        return spec.attention_patterns()
    if which == "converted":
        kinds = conversion_kinds(config)
        if kinds is None:
            raise UptrainError(f"trainable: converted needs the conversion record (gqa_conversion) in the model's "
                               f"config.json, and this {model_type} model has none; uptrain a gqa-convert output "
                               "or use trainable: attention")
        return spec.attention_patterns(kinds)
    if any(t.part == "qkv" for t in spec.tensors):
        raise UptrainError(f"{model_type} fuses Q, K and V in one tensor, so K/V cannot train alone; use "
                           "trainable: attention")
    return [key_pattern(t.key) for t in spec.tensors]


def resolve_trainable(config, which: str) -> str:
    """`which`, with `auto` made concrete: speech models train the attention the conversion changed (all their
    attention when the config holds no conversion record), text models everything."""
    if which != "auto":
        return which
    from gqa_toolkit.families.spec import audio_input

    if audio_input(config.model_type) is None:
        return "all"
    return "converted" if conversion_kinds(config) is not None else "attention"


def select_trainable(model: nn.Module, which: str) -> list[str]:
    """Freeze everything but `which`; returns the names of the parameters left trainable."""
    which = resolve_trainable(model.config, which)
    if which == "all":
        chosen = {n for n, _ in model.named_parameters()}
    else:
        patterns = _patterns(model.config, which)
        chosen = {n for n, _ in model.named_parameters() if any(p.match(n) for p in patterns)}
    if not chosen:
        raise UptrainError(f"trainable: {which} matches no parameter of this {model.config.model_type} model; "
                           "use trainable: all")
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return sorted(chosen)


def make_optimizer(model: nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only), or Adafactor as in the paper's T5 uptraining."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # an external schedule sets the lr each step, so Adafactor's own relative step sizes are off
        return Adafactor([p for _, p in params], lr=cfg.lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.weight_decay)
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)
