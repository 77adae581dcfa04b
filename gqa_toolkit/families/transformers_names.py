"""Names that transformers has moved between the releases the toolkit supports, read from the installed one.

transformers 5.24 renamed the cache of model forwards and outputs from `past_key_values` to `cache` (the old name
warns, and goes in 5.40); older releases know only `past_key_values`.
"""

from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    """The keyword under which `model`'s forward takes the KV cache."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a model forward returned."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def enable_activation_checkpointing(model, **checkpoint_kwargs) -> None:
    """Recompute activations in the backward pass (`activation_checkpointing_enable` from transformers 5.24,
    `gradient_checkpointing_enable` before it); `checkpoint_kwargs` go to torch.utils.checkpoint."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
