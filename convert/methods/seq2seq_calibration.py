"""Calibration moments of an encoder-decoder (t5, bart, mbart, marian), from forwards of the whole model.

The encoder reads the calibration tokens; the decoder reads the same tokens as its target, shifted right the
family's own way (teacher forcing on the text itself). Each block's query input gives its moments; a cross-attention
block (`keys_from_encoder`) also gets the moments of its key input, the encoder's states, so its K/V maps are
weighed by what they really read. Peak memory is the whole model: the block-by-block stream runs decoder-only
models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ConversionError
from ..families.loading import from_pretrained, loading_bars
from ..families.spec import AttentionBlock, key_pattern, lm_auto_class_name
from .layer_types import HandedOnce

# attention kind -> (query input moments by layer, key input moments by layer for cross-attention, else None)
Moments = dict[str, tuple[HandedOnce, HandedOnce | None]]


def _modules(model: torch.nn.Module, templates: tuple[str, ...]) -> dict[int, torch.nn.Module]:
    """layer -> the module named by the first template that names any."""
    for template in templates:
        pattern = key_pattern(template)
        found = {int(m["layer"]): module for name, module in model.named_modules() if (m := pattern.match(name))}
        if found:
            return found
    raise ConversionError(f"no module of the model matches {templates}, so calibration cannot see the attention "
                          f"inputs; pass --calibration none to convert on the weights")


@torch.no_grad()
def encoder_decoder_moments(model_dir: Path, blocks: list[AttentionBlock], tokens: torch.Tensor, *,
                            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                            batch_size: int = 8, progress: Callable[[int], object] | None = None) -> Moments:
    import transformers

    config = from_pretrained(transformers.AutoConfig, model_dir)
    auto = getattr(transformers, lm_auto_class_name(config.model_type, encoder_decoder=True))
    with loading_bars(progress is not None):
        model = from_pretrained(auto, model_dir, dtype=dtype).to(device).eval()
    vocab = model.get_input_embeddings().num_embeddings
    if tokens.max() >= vocab:
        raise ConversionError(f"calibration token id {int(tokens.max())} is outside the model's vocabulary of "
                              f"{vocab}; calibrate with the source's own tokenizer (--calibration TEXT)")
    moments: Moments = {}
    hooks = []
    for block in blocks:
        query, keys = HandedOnce(), (HandedOnce() if block.keys_from_encoder else None)
        moments[block.attention] = (query, keys)
        for recorded, templates in ((query, block.q), (keys, block.k)):
            if recorded is None:
                continue
            hooks += recorded.record(_modules(model, templates))
    bar = progress(len(range(0, len(tokens), batch_size))) if progress is not None else None
    try:
        for first in range(0, len(tokens), batch_size):
            ids = tokens[first:first + batch_size].to(device)  # (B, T)
            # the text as the decoder's target: each family shifts it right in its own way (mBART wraps the
            # language code), as in training
            decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=ids)
            model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False)
            if bar is not None:
                bar.update()
    finally:
        for hook in hooks:
            hook.remove()
        if bar is not None:
            bar.close()
    return moments
