"""The source model run one block at a time, for calibration: peak memory is the embeddings, one block and the
calibration activations, whatever the depth.

The model's skeleton is built from its config with every parameter on the meta device (buffers, such as rotary
frequencies, are real). The modules before the blocks (embeddings, positions) are materialised from the shards
through the lazy reader, and one forward with recorders in place of the blocks notes what the model hands each
block (hidden states, masks, position tensors). Each block is then materialised on the device, run on its
recorded arguments with the previous block's outputs, and sent back to the meta device. The same mechanism
serves every family: it asks the spec only where the blocks and their query projections are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConversionError
from ..families.loading import from_pretrained, loading_bars
from ..families.spec import AttentionBlock, key_pattern
from ..io.reader import CheckpointReader
from .layer_types import HandedOnce, InputMoments


class _Caught(Exception):
    """Raised to stop a forward once what is needed has been recorded."""


class _Recorder(nn.Module):
    """Stands in for one block during the capture pass: records what the model hands it (each block may get its
    own mask: gemma2 alternates sliding and full attention) and passes the hidden states on; the last one stops
    the forward."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.last:
            raise _Caught
        return args[0] if args else kwargs["hidden_states"]


def _stop(module, args):
    raise _Caught


@dataclass(frozen=True)
class Blocks:
    """Where the blocks are: the ModuleList's name and, inside block i, the query projection's name."""

    container: str  # e.g. "model.layers"
    query: str  # e.g. "self_attn.q_proj"


def find_blocks(model: nn.Module, block: AttentionBlock) -> Blocks:
    patterns = [(t, key_pattern(t)) for t in block.inputs]
    for name, _ in model.named_modules():
        for template, pattern in patterns:
            if m := pattern.match(name):
                before, after = template.split("{layer}")
                return Blocks(container=m["prefix"] + before.rstrip("."), query=after.lstrip("."))
    raise ConversionError(f"no module of the model matches the family's attention input {block.inputs}; "
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


def _run(layer: nn.Module, call: tuple) -> torch.Tensor | None:
    """The block's output hidden states, or None when a hook stopped it early."""
    try:
        return _first_output(layer(*call[0], **call[1]))
    except _Caught:
        return None


def _hidden_of(call: tuple) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple, hidden: torch.Tensor) -> tuple:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class BlockStream:
    """The source, ready to run block by block: built, checked and every block's arguments recorded when made
    (so bad input fails before any output is written); iterating runs the blocks and yields (layer, moments)."""

    @torch.no_grad()
    def __init__(self, model_dir: Path, block: AttentionBlock, tokens: torch.Tensor, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8,
                 progress: Callable[[int], object] | None = None,
                 converted: Callable[[int], dict[str, torch.Tensor]] | None = None, kv_head_dim: int | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device, self.dtype, self.progress = device, dtype, progress
        # sequential mode: block i's outputs come from its converted weights, so later layers are calibrated on
        # what the converted model computes (`converted(i)`: on-disk name -> tensor, K/V with G heads)
        self.converted, self.kv_head_dim = converted, kv_head_dim
        config = from_pretrained(AutoConfig, model_dir)
        with init_empty_weights(include_buffers=False):
            self.model = model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        for module in model.modules():  # the buffers go to the device; the parameters stay on the meta device
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        self.where = where = find_blocks(model, block)
        self.blocks = blocks = model.get_submodule(where.container)
        self.weights = weights = _Weights(model_dir, model.base_model_prefix)
        vocab = model.get_input_embeddings().num_embeddings
        if tokens.max() >= vocab:
            raise ConversionError(f"calibration token id {int(tokens.max())} is outside the model's vocabulary of "
                                  f"{vocab}")
        self.whole = None
        if any(weights.find(f"{where.container}.0.{n}") is None for n, _ in blocks[0].named_parameters()):
            # transformers reshapes this checkpoint while loading it (mixtral's experts are merged): the on-disk
            # names are not the modules', so the whole model is loaded through transformers instead
            if converted is not None:
                raise ConversionError("sequential calibration needs a checkpoint whose on-disk names are the "
                                      "model's, and transformers reshapes this one while loading it; use "
                                      "--calibration-mode source")
            self.whole = _whole_model_moments(model_dir, where, tokens, device, dtype, batch_size,
                                              bars=progress is not None)
            return
        # everything outside the blocks but the LM head (the forward stops before it): embeddings, positions, norms
        head = _module_name(model, model.get_output_embeddings())
        outside = [n for n, _ in model.named_parameters() if weights.find(n) is not None
                   and not n.startswith(where.container + ".") and not (head and n.startswith(head + "."))]
        _materialise(model, outside, weights, device, dtype)
        self.calls: list[list] = [[] for _ in blocks]  # per block, per batch: (args, kwargs) as the model passed them
        originals = list(blocks)
        for i in range(len(blocks)):
            blocks[i] = _Recorder(self.calls[i], last=i == len(blocks) - 1)
        for start in range(0, len(tokens), batch_size):
            try:
                model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            except _Caught:
                pass
        for i, original in enumerate(originals):
            blocks[i] = original
        _free(model, outside)  # only the capture pass needed the embeddings
        self.hidden = [_hidden_of(call) for call in self.calls[0]]  # per batch: the first block's input
        self.width = self.hidden[0].shape[-1]  # d: the attention input's width, whatever the projection's class

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[int, InputMoments]]:
        if self.whole is not None:
            yield from self.whole.items()
            return
        bar = self.progress(len(self.blocks)) if self.progress is not None else None
        for i, layer in enumerate(self.blocks):
            names = [f"{self.where.container}.{i}.{n}" for n, _ in layer.named_parameters()]
            _materialise(self.model, names, self.weights, self.device, self.dtype)
            calls = [_with_hidden(call, hidden) for call, hidden in zip(self.calls[i], self.hidden)]
            self.calls[i] = None
            query = layer.get_submodule(self.where.query)
            moments = InputMoments(self.width)
            hooks = [query.register_forward_pre_hook(lambda mod, args: moments.add(args[0]))]
            if self.converted is not None:  # this pass only measures the inputs: stop at the query projection
                hooks.append(query.register_forward_pre_hook(_stop))
            outputs = [_run(layer, call) for call in calls]
            for hook in hooks:
                hook.remove()
            if bar is not None:  # counted before the yield: the converter stops asking after the last block
                bar.update()
                if i == len(self.blocks) - 1:
                    bar.close()
            yield i, moments
            if self.converted is not None:
                self._load_converted(names, self.converted(i))
                outputs = [_run(layer, call) for call in calls]
            self.hidden = outputs
            _free(self.model, names)
        self.hidden = []  # the activations go as soon as the last block has run

    def _load_converted(self, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Put a converted layer's projections into the (MHA-shaped) block: K/V with G heads are repeated to the
        block's K/V heads, group j serving the contiguous heads it replaced, which computes the same attention."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            key = self.weights.find(name)
            if key not in tensors:
                continue
            value, shape = tensors[key], self.model.get_parameter(name).shape
            if tuple(value.shape) != tuple(shape):
                heads = value.view(-1, self.kv_head_dim, *value.shape[1:])  # (G, hd, ...)
                value = heads.repeat_interleave(shape[0] // value.shape[0], dim=0).reshape(shape)  # (G0 * hd, ...)
            set_module_tensor_to_device(self.model, name, self.device, value=value.to(self.dtype))


class StreamedMoments(Mapping):
    """Layer -> moments, computed when first asked for and handed out once: the converter asks layer by layer,
    so the stream runs only as far as the layer being converted and each layer's moments are freed after use."""

    def __init__(self, stream: BlockStream):
        self._stream, self._ready, self._layers = iter(stream), {}, len(stream.blocks)

    def __getitem__(self, layer: int) -> InputMoments:
        while layer not in self._ready:
            try:
                i, moments = next(self._stream)
            except StopIteration:
                raise KeyError(layer) from None
            self._ready[i] = moments
        return self._ready.pop(layer)

    def __iter__(self):
        return iter(range(self._layers))

    def __len__(self) -> int:
        return self._layers


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _whole_model_moments(model_dir: Path, where: Blocks, tokens: torch.Tensor, device, dtype, batch_size: int,
                         bars: bool):
    from transformers import AutoModelForCausalLM

    with loading_bars(bars):
        model = from_pretrained(AutoModelForCausalLM, model_dir, dtype=dtype).to(device).eval()
    moments = HandedOnce()
    hooks = moments.record({i: layer.get_submodule(where.query)
                            for i, layer in enumerate(model.get_submodule(where.container))})
    try:
        for start in range(0, len(tokens), batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return moments
