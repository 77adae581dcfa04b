"""The source model run one block at a time, for calibration: peak memory is the embeddings, one block and the
calibration activations, whatever the depth.

The model's skeleton is built from its config with every parameter on the meta device (buffers, such as rotary
frequencies, are real). The modules before the blocks (embeddings, positions) are materialised from the shards
through the lazy reader; a catcher in place of the first block records what the model hands it (hidden states,
masks, position tensors) and stops the forward. Each block is then materialised on the device, the recorded inputs
are run through it, its outputs become the next block's inputs, and it goes back to the meta device. The same
mechanism serves every family: it asks the spec only where the blocks and their query projections are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .architectures.spec import AttentionBlock, key_pattern
from .errors import ConversionError
from .layer_block import InputMoments
from .loading import from_pretrained
from .reader import CheckpointReader


class _Caught(Exception):
    """Raised by the catcher to stop the forward once the first block's inputs are recorded."""


class _Catcher(nn.Module):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise _Caught


@dataclass(frozen=True)
class Blocks:
    """Where the blocks are: the ModuleList's name and, inside block i, the query projection's name."""

    container: str  # e.g. "model.layers"
    query: str  # e.g. "self_attn.q_proj"


def find_blocks(model: nn.Module, block: AttentionBlock) -> Blocks:
    patterns = [(t, key_pattern(t)) for t in block.q]
    for name, _ in model.named_modules():
        for template, pattern in patterns:
            if m := pattern.match(name):
                before, after = template.split("{layer}")
                return Blocks(container=m["prefix"] + before.rstrip("."), query=after.lstrip("."))
    raise ConversionError(f"no module of the model matches the family's query projection {block.q}; "
                          f"calibration cannot see the attention inputs")


class _Weights:
    """A model parameter's on-disk tensor, read lazily (the name as the model has it, or without the base-model
    prefix, as some checkpoints were saved)."""

    def __init__(self, model_dir: Path, prefix: str):
        self.reader, self.prefix = CheckpointReader(model_dir), prefix

    def find(self, name: str) -> str | None:
        for key in (name, name.removeprefix(self.prefix + ".")):
            if key in self.reader.infos:
                return key
        return None


def _materialise(model: nn.Module, names: list[str], weights: _Weights, device, dtype) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        key = weights.find(name)
        if key is None:
            raise ConversionError(f"the checkpoint has no tensor for {name!r}, which calibration needs")
        value = weights.reader.read(key)
        set_module_tensor_to_device(model, name, device, value=value.to(dtype) if value.is_floating_point() else value)


def _free(model: nn.Module, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "meta")


def _first_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(call: tuple, hidden: torch.Tensor) -> tuple:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def collect_moments(model_dir: Path, block: AttentionBlock, tokens: torch.Tensor, *, device: torch.device | str =
                    "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8,
                    progress: Callable[[int], object] | None = None) -> dict[int, InputMoments]:
    """Layer -> moments of the input to its query projection, from the source run on `tokens` block by block.
    `progress(n_blocks)` returns an object with `update()` (a tqdm bar), or None for no progress."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = from_pretrained(AutoConfig, model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    for module in model.modules():  # the buffers go to the device; the parameters stay on the meta device
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    where = find_blocks(model, block)
    blocks = model.get_submodule(where.container)
    weights = _Weights(model_dir, model.base_model_prefix)
    vocab = model.get_input_embeddings().num_embeddings
    if tokens.max() >= vocab:
        raise ConversionError(f"calibration token id {int(tokens.max())} is outside the model's vocabulary of "
                              f"{vocab}")

    block_names = [f"{where.container}.0.{n}" for n, _ in blocks[0].named_parameters()]
    if any(weights.find(n) is None for n in block_names):
        # transformers reshapes this checkpoint while loading it (mixtral's experts are merged): the on-disk
        # names are not the modules', so the whole model is loaded through transformers instead
        return _whole_model_moments(model_dir, where, tokens, device, dtype, batch_size)
    # everything outside the blocks but the LM head (the forward stops before it): embeddings, positions, norms
    head = _module_name(model, model.get_output_embeddings())
    outside = [n for n, _ in model.named_parameters()
               if not n.startswith(where.container + ".") and not (head and n.startswith(head + "."))]
    _materialise(model, [n for n in outside if weights.find(n) is not None], weights, device, dtype)

    calls: list = []
    first = blocks[0]
    blocks[0] = _Catcher(calls)
    for start in range(0, len(tokens), batch_size):
        try:
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
        except _Caught:
            pass
    blocks[0] = first

    moments: dict[int, InputMoments] = {}
    bar = progress(len(blocks)) if progress is not None else None
    for i, layer in enumerate(blocks):
        names = [f"{where.container}.{i}.{n}" for n, _ in layer.named_parameters()]
        _materialise(model, names, weights, device, dtype)
        query = layer.get_submodule(where.query)
        moments[i] = InputMoments(query.in_features)
        hook = query.register_forward_pre_hook(lambda mod, args, m=moments[i]: m.add(args[0]))
        calls = [_with_hidden(call, _first_output(layer(*call[0], **call[1]))) for call in calls]
        hook.remove()
        _free(model, names)
        if bar is not None:
            bar.update()
    return moments


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _whole_model_moments(model_dir: Path, where: Blocks, tokens: torch.Tensor, device, dtype, batch_size: int):
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, model_dir, dtype=dtype).to(device).eval()
    moments, hooks = {}, []
    for i, layer in enumerate(model.get_submodule(where.container)):
        query = layer.get_submodule(where.query)
        moments[i] = InputMoments(query.in_features)
        hooks.append(query.register_forward_pre_hook(lambda mod, args, m=moments[i]: m.add(args[0])))
    for start in range(0, len(tokens), batch_size):
        model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    for hook in hooks:
        hook.remove()
    return moments
