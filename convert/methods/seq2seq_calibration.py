"""Calibration moments of an encoder-decoder (t5, bart, mbart, marian), from forwards of the whole model.

The encoder reads the calibration tokens; the decoder reads the same tokens shifted right behind its start token
(teacher forcing on the text itself). Each block's query input gives its moments; a cross-attention block
(`keys_from_encoder`) also gets the moments of its key input, the encoder's states, so its K/V maps are weighed by
what they really read. Peak memory is the whole model: the block-by-block stream runs decoder-only models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ConversionError
from ..families.loading import from_pretrained
from ..families.spec import AttentionBlock, key_pattern, lm_auto_class_name
from .layer_types import InputMoments

# attention kind -> (query input moments by layer, key input moments by layer for cross-attention, else None)
Moments = dict[str, tuple[dict[int, InputMoments], dict[int, InputMoments] | None]]


def _modules(model: torch.nn.Module, templates: tuple[str, ...]) -> dict[int, torch.nn.Module]:
    """layer -> the module named by the first template that names any."""
    for template in templates:
        pattern = key_pattern(template)
        found = {int(m["layer"]): module for name, module in model.named_modules() if (m := pattern.match(name))}
        if found:
            return found
    raise ConversionError(f"no module of the model matches {templates}; calibration cannot see the attention inputs")


def _recorder(moments: dict[int, InputMoments], layer: int):
    def hook(module, args):
        x = args[0]
        moments.setdefault(layer, InputMoments(x.shape[-1])).add(x)
    return hook


@torch.no_grad()
def encoder_decoder_moments(model_dir: Path, blocks: list[AttentionBlock], tokens: torch.Tensor, *,
                            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                            batch_size: int = 8, progress: Callable[[int], object] | None = None) -> Moments:
    import transformers

    config = from_pretrained(transformers.AutoConfig, model_dir)
    auto = getattr(transformers, lm_auto_class_name(config.model_type, encoder_decoder=True))
    model = from_pretrained(auto, model_dir, dtype=dtype).to(device).eval()
    vocab = model.get_input_embeddings().num_embeddings
    if tokens.max() >= vocab:
        raise ConversionError(f"calibration token id {int(tokens.max())} is outside the model's vocabulary of {vocab}")
    start = config.decoder_start_token_id
    if start is None:
        raise ConversionError(f"{model_dir}/config.json has no decoder_start_token_id, which the decoder's "
                              "calibration inputs start with; set it, or pass --calibration none")
    moments: Moments = {}
    hooks = []
    for block in blocks:
        query, keys = {}, ({} if block.keys_from_encoder else None)
        moments[block.attention] = (query, keys)
        for recorded, templates in ((query, block.q), (keys, block.k)):
            if recorded is None:
                continue
            for layer, module in _modules(model, templates).items():
                hooks.append(module.register_forward_pre_hook(_recorder(recorded, layer)))
    bar = progress(len(range(0, len(tokens), batch_size))) if progress is not None else None
    try:
        for first in range(0, len(tokens), batch_size):
            ids = tokens[first:first + batch_size].to(device)  # (B, T)
            decoder_ids = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)  # shifted right
            model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False)
            if bar is not None:
                bar.update()
    finally:
        for hook in hooks:
            hook.remove()
        if bar is not None:
            bar.close()
    return moments
