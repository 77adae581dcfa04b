"""The source model run one block at a time, for calibration: peak memory is what lies outside the blocks
(embeddings, norms), one block and the calibration activations (with an encoder's last outputs), whatever the depth.

The model's skeleton is built from its config with every parameter on the meta device (buffers, such as rotary
frequencies, are real), and the modules outside the blocks (embeddings, positions, norms) are materialised from
the shards through the lazy reader. Every ModuleList of blocks (a decoder-only model's one; an encoder-decoder's
encoder and decoder stacks) gets stand-ins. Each step runs the model's own forward on every calibration batch:
the stand-ins of the blocks already run hand back the outputs of the last one, from which the model makes the
next block's arguments as it always does (hidden states, masks, t5's position bias); the first block not yet run
records the arguments it is handed and stops the forward. That block is materialised on the device, run on them
with hooks on its attention inputs, and sent back to the meta device. The forward finishes the encoder's stack
before it reaches the decoder's, so cross-attention reads the real encoder states. The same mechanism serves
every family: it asks the spec only where the blocks and their projections are.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConversionError
from ..families.loading import from_pretrained, loading_bars
from ..families.spec import AttentionBlock, key_pattern, lm_auto_class_name
from ..io.reader import CheckpointReader
from .layer_types import InputMoments
from .refinement import AttentionCalls

SEQUENTIAL_NEEDS_NAMES = ("sequential calibration needs a checkpoint whose on-disk names are the model's, and "
                          "transformers reshapes this one while loading it; use --calibration-mode source")
REFINEMENT_NEEDS_NAMES = SEQUENTIAL_NEEDS_NAMES.replace("sequential calibration", "refinement").replace(
    "use --calibration-mode source", "drop --refine-steps")
QUERY, KEYS = "query", "keys"  # the roles of a recorded input: Q's (every block), K's and V's (cross-attention)
Key = tuple[str, str, int]  # (attention kind, role, layer)


@dataclass
class BlockStep:
    """One block's turn: the moments of its attention inputs by (attention kind, role, layer); in sequential mode the
    consumer puts the block's converted projections in `converted` (on-disk name -> tensor shaped as the source's,
    K/V repeated to its heads) before asking for the next step, and the block runs on them."""

    moments: dict[Key, InputMoments]
    converted: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: dict[str, AttentionCalls] = field(default_factory=dict)  # kind -> its module and calls (refinement)


class _Reached(Exception):
    """The forward reached the first block not yet run: the arguments the model handed it."""

    def __init__(self, stack: str, index: int, call: tuple):
        super().__init__(stack, index)
        self.stack, self.index, self.call = stack, index, call


class _Stop(Exception):
    """Raised by a hook once every attention input of a block is recorded, when its outputs are not needed."""


class _StandIn(nn.Module):
    """Block `index` of `stack` during the forwards: answers through `replay` (the last outputs, or _Reached)."""

    def __init__(self, replay: Callable, stack: str, index: int):
        super().__init__()
        self.replay, self.stack, self.index = replay, stack, index

    def forward(self, *args, **kwargs):
        return self.replay(self.stack, self.index, (args, kwargs))


@dataclass(frozen=True)
class AttentionInputs:
    """Where one attention kind reads its inputs: the ModuleList of its blocks and, inside a block, the query
    projection (or the fused one) and, for cross-attention, the key projection."""

    attention: str
    stack: str  # e.g. "model.layers", "decoder.block"
    query: str  # e.g. "self_attn.q_proj"
    keys: str | None = None  # e.g. "layer.1.EncDecAttention.k"

    def modules(self) -> dict[str, str]:
        """role -> the module's name inside a block."""
        return {QUERY: self.query, **({KEYS: self.keys} if self.keys else {})}

    @property
    def attention_module(self) -> str:
        """The attention module inside a block: the query projection's parent."""
        return self.query.rpartition(".")[0]


def _locate(model: nn.Module, templates: tuple[str, ...]) -> tuple[str, str]:
    patterns = [(t, key_pattern(t)) for t in templates]
    for name, _ in model.named_modules():
        for template, pattern in patterns:
            if m := pattern.match(name):
                before, after = template.split("{layer}")
                return m["prefix"] + before.rstrip("."), after.lstrip(".")
    raise ConversionError(f"no module of the model matches the family's attention input {templates}; "
                          f"calibration cannot see the attention inputs")


def _attention_inputs(model: nn.Module, block: AttentionBlock) -> AttentionInputs:
    stack, query = _locate(model, block.inputs)
    keys = _locate(model, block.k)[1] if block.keys_from_encoder else None
    return AttentionInputs(block.attention, stack, query, keys)


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


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Each parameter's names: tied ones (t5's shared embeddings, read by both stacks and the head) share one."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return list(names.values())


def _materialise(module: nn.Module, tensors: list[list[str]], weights: _Weights, device, dtype,
                 prefix: str = "") -> None:
    """Read each tensor once (under whichever of its names the checkpoint has, `prefix` + the module's own) and
    put it under all its names."""
    from accelerate.utils import set_module_tensor_to_device

    for names in tensors:
        key = next((k for k in (weights.find(prefix + n) for n in names) if k is not None), None)
        if key is None:
            raise ConversionError(f"the checkpoint has no tensor for {prefix + names[0]!r}, which calibration needs")
        value = weights.reader.read(key)
        value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        expected = tuple(module.get_parameter(names[0]).shape)
        if tuple(value.shape) != expected:
            raise ConversionError(f"the checkpoint's {key} has shape {tuple(value.shape)}, and config.json makes it "
                                  f"{expected}; the weight files do not match config.json")
        for name in names:
            set_module_tensor_to_device(module, name, device, value=value)


def _made_on_load(model: nn.Module, names: list[str]) -> bool:
    """A parameter no checkpoint holds, which transformers makes when it loads the model (Marian's sinusoidal
    positions): one the model's class says may be missing."""
    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    return any(re.search(pattern, name) for pattern in patterns for name in names)


def _initialise(model: nn.Module, tensors: list[list[str]], device, dtype) -> None:
    """Make parameters as transformers makes them when it loads the model: by the model's own initialisation of
    their module."""
    from accelerate.utils import set_module_tensor_to_device

    for names in tensors:
        owner, _, attribute = names[0].rpartition(".")
        module = model.get_submodule(owner)
        value = torch.empty(getattr(module, attribute).shape, device=device, dtype=dtype)
        for name in names:
            set_module_tensor_to_device(model, name, device, value=value)
        model._init_weights(module)


def _free(module: nn.Module, tensors: list[list[str]]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in (n for names in tensors for n in names):
        set_module_tensor_to_device(module, name, "meta")
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand freed pages back to the system. glibc keeps them in its heap, and each step's forwards allocate the
    same activations again, so without this the heap fragments and peak RSS grows with depth (measured in
    docs/bench_calibration.md)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _record(modules: Mapping[Key, nn.Module], moments: dict[Key, InputMoments], stop: bool = False) -> list:
    """Hooks adding each module's input to its moments; with `stop`, the last of them to fire stops the block."""
    seen: set[Key] = set()

    def hook(key):
        def add(module, args):
            moments.setdefault(key, InputMoments(args[0].shape[-1])).add(args[0])
            seen.add(key)
            if stop and len(seen) == len(modules):
                seen.clear()
                raise _Stop
        return add
    return [module.register_forward_pre_hook(hook(key)) for key, module in modules.items()]


def _run(layer: nn.Module, call: tuple):
    """The block's outputs, as the model's stack takes them, or None when a hook stopped it early."""
    try:
        return layer(*call[0], **call[1])
    except _Stop:
        return None


def _skeleton(model_dir: Path, device, dtype) -> tuple[nn.Module, type]:
    """The source's model with its LM head (and the Auto class that builds it), every parameter on the meta
    device, tied ones tied, buffers (rotary frequencies) real on `device`."""
    import transformers
    from accelerate import init_empty_weights

    config = from_pretrained(transformers.AutoConfig, model_dir)
    auto = getattr(transformers, lm_auto_class_name(config.model_type, config.is_encoder_decoder))
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype).eval()
    model.tie_weights()  # the skeleton is built untied; tied parameters are one tensor, materialised once
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model, auto


def _outside(model: nn.Module, stacks: Collection[str]) -> list[list[str]]:
    """The parameters outside the blocks but an untied LM head, which no forward here reaches: embeddings,
    positions, norms."""
    head = next((name for name, m in model.named_modules() if m is model.get_output_embeddings()), None)
    return [names for names in _tied_names(model)
            if not any(n.startswith(stack + ".") for n in names for stack in stacks)
            and not all(head and n.startswith(head + ".") for n in names)]


class _Source:
    """The source's skeleton, where its stacks of blocks and attention inputs are, and its weights on disk."""

    def __init__(self, model_dir: Path, blocks: Sequence[AttentionBlock], device, dtype):
        self.model, self.auto = _skeleton(model_dir, device, dtype)
        self.located = [_attention_inputs(self.model, block) for block in blocks]
        self.stacks = {name: self.model.get_submodule(name) for name in dict.fromkeys(i.stack for i in self.located)}
        self.weights = _Weights(model_dir, self.model.base_model_prefix)
        self.outside = _outside(self.model, self.stacks)

    @property
    def reshaped_on_load(self) -> bool:
        """transformers reshapes this checkpoint while loading it (mixtral's experts are merged): the on-disk
        names are not the modules', so only a whole-model load through transformers reads it."""
        return any(self.weights.find(f"{stack}.0.{n}") is None
                   for stack, layers in self.stacks.items() for n, _ in layers[0].named_parameters())


@dataclass(frozen=True)
class Footprint:
    """What block-by-block calibration holds, in parameters: outside the blocks, the largest block, the whole
    model when the checkpoint must be loaded whole; and the width of the attention input."""

    outside: int
    block: int
    whole: int | None
    width: int


def calibration_footprint(model_dir: Path, blocks: Sequence[AttentionBlock]) -> Footprint:
    """For the dry run: from the same skeleton the stream builds, with no weight read."""
    source = _Source(model_dir, blocks, "meta", torch.float32)
    model = source.model
    width = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    return Footprint(outside=sum(model.get_parameter(names[0]).numel() for names in source.outside),
                     block=max(sum(p.numel() for p in layers[0].parameters()) for layers in source.stacks.values()),
                     whole=sum(p.numel() for p in model.parameters()) if source.reshaped_on_load else None,
                     width=width)


class BlockStream:
    """The source, ready to run block by block: built, checked and the first block's arguments recorded when made
    (so bad input fails before any output is written); iterating runs the blocks in the order the model's forward
    reaches them and yields one BlockStep per block, with the moments of the attention inputs of the kinds asked
    for; a checkpoint that only loads whole yields one step with every layer's. The calibration is token ids
    `(sequences, length)`, batched here, or the model's forward arguments per batch, made by the caller (whisper's
    log-mel features and decoder tokens: methods/audio_calibration.py)."""

    @torch.no_grad()
    def __init__(self, model_dir: Path, blocks: Sequence[AttentionBlock],
                 calibration: torch.Tensor | Sequence[Mapping[str, torch.Tensor]], *,
                 kinds: Collection[str] | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 8,
                 progress: Callable[[int], object] | None = None, sequential: bool = False,
                 record_calls: bool = False):
        self.device, self.dtype, self.progress = device, dtype, progress
        # sequential mode: a block's outputs come from its converted weights (what the consumer puts in the step's
        # `converted`), so later layers are calibrated on what the converted model computes
        self.sequential = sequential
        self.record_calls = record_calls  # refinement: each attention module's arguments, to run it again
        source = _Source(model_dir, blocks, device, dtype)
        model, weights = source.model, source.weights
        self.model, self.stacks, self.weights, self.outside = model, source.stacks, weights, source.outside
        self.recorded = [i for i in source.located if kinds is None or i.attention in kinds]
        self.layers = {i.attention: len(self.stacks[i.stack]) for i in self.recorded}
        if isinstance(calibration, torch.Tensor):
            self.inputs = self._text_inputs(calibration, batch_size)
        else:  # the model's forward arguments per batch, made by the caller (audio features and transcripts)
            self.inputs = [{**{k: v.to(device) for k, v in batch.items()}, "use_cache": False} for batch in calibration]
            if not self.inputs:
                raise ConversionError("the calibration holds no batch; give some calibration data")
        self.whole = None
        if source.reshaped_on_load:
            if sequential or record_calls:
                raise ConversionError(SEQUENTIAL_NEEDS_NAMES if sequential else REFINEMENT_NEEDS_NAMES)
            self.whole = self._whole_model_moments(model_dir, source.auto, bars=progress is not None)
            return
        made = [names for names in self.outside if all(weights.find(n) is None for n in names)
                and _made_on_load(model, names)]
        _materialise(model, [names for names in self.outside if names not in made], weights, device, dtype)
        _initialise(model, made, device, dtype)
        self.originals = {name: list(layers) for name, layers in self.stacks.items()}
        for name, layers in self.stacks.items():
            for i in range(len(layers)):
                layers[i] = _StandIn(self._replay, name, i)
        self.done = dict.fromkeys(self.stacks, 0)  # per stack: how many of its blocks have run
        self.outputs: dict[str, list] = {}  # per stack, per batch: what its last block run returned
        self.pending = self._reach()

    def _text_inputs(self, tokens: torch.Tensor, batch_size: int) -> list[dict]:
        """Token ids `(sequences, length)` as the model's arguments, `batch_size` sequences a batch."""
        vocab = self.model.get_input_embeddings().num_embeddings
        if tokens.numel() == 0:
            raise ConversionError("the calibration holds no tokens; give token ids of shape (sequences, length)")
        if tokens.max() >= vocab:
            raise ConversionError(f"calibration token id {int(tokens.max())} is outside the model's vocabulary of "
                                  f"{vocab}; calibrate with the source's own tokenizer (--calibration TEXT)")
        return [self._forward_inputs(tokens[first:first + batch_size].to(self.device))
                for first in range(0, len(tokens), batch_size)]

    def _forward_inputs(self, ids: torch.Tensor) -> dict:
        """The model's arguments for one batch `(B, T)`: an encoder-decoder's decoder reads the text as its target,
        shifted right by the family's own rule (mBART wraps its language code), as in training."""
        if not self.model.config.is_encoder_decoder:
            return {"input_ids": ids, "use_cache": False}
        return {"input_ids": ids, "decoder_input_ids": self.model.prepare_decoder_input_ids_from_labels(labels=ids),
                "use_cache": False}

    def _replay(self, stack: str, index: int, call: tuple):
        if index < self.done[stack]:
            return self.outputs[stack][self.batch]
        raise _Reached(stack, index, call)

    def _reach(self) -> tuple[str, int, list]:
        """Every batch's forward up to the first block not yet run: its stack, its index and its arguments."""
        calls = []
        for self.batch, inputs in enumerate(self.inputs):
            try:
                self.model(**inputs)
            except _Reached as reached:
                calls.append(reached.call)
                where = reached.stack, reached.index
            else:
                raise ConversionError("the model's forward ran through every block without reaching one not yet "
                                      "run; calibration cannot run this model block by block")
        return *where, calls

    @torch.no_grad()
    def __iter__(self) -> Iterator[BlockStep]:
        if self.whole is not None:
            yield BlockStep(self.whole)
            return
        total = sum(map(len, self.originals.values()))
        bar = self.progress(total) if self.progress is not None else None
        try:
            for _ in range(total):
                yield from self._step(bar)
        finally:  # also when the converter, done with its last layer, closes the stream
            if bar is not None:
                bar.close()
            self.outputs = {}
            for layer in (layer for layers in self.originals.values() for layer in layers):
                if live := [[n] for n, p in layer.named_parameters() if p.device.type != "meta"]:
                    _free(layer, live)
            _free(self.model, self.outside)

    def _step(self, bar) -> Iterator[BlockStep]:
        """Run the first block not yet run on every batch, yield its attention inputs' moments (and in sequential
        mode take back its converted projections), keep its outputs for the next step and free it."""
        stack, index, calls = self.pending if self.pending is not None else self._reach()
        self.pending = None
        layer = self.originals[stack][index]
        names, prefix = [[n] for n, _ in layer.named_parameters()], f"{stack}.{index}."
        _materialise(layer, names, self.weights, self.device, self.dtype, prefix)
        inside = [i for i in self.recorded if i.stack == stack]
        modules = {(i.attention, role, index): layer.get_submodule(name)
                   for i in inside for role, name in i.modules().items()}
        moments: dict[Key, InputMoments] = {}
        # sequential mode runs the block again once converted: this pass only measures its inputs
        sequential = self.sequential and bool(inside)
        hooks = _record(modules, moments, stop=sequential)
        attention = {}
        if self.record_calls:
            for i in inside:
                module = layer.get_submodule(i.attention_module)
                on_disk = {n: self.weights.find(f"{prefix}{i.attention_module}.{n}") for n, _ in module.named_parameters()}
                attention[i.attention] = AttentionCalls(module, {n: d for n, d in on_disk.items() if d}, [])
                hooks.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, recorded=attention[i.attention].calls: recorded.append((args, kwargs)),
                    with_kwargs=True))
        outputs = [_run(layer, call) for call in calls]
        for hook in hooks:
            hook.remove()
        if bar is not None:  # counted before the yield: the converter stops asking after its last layer
            bar.update()
        step = BlockStep(moments, attention=attention)
        yield step
        if sequential:
            self._load_converted(layer, prefix, step.converted)
            outputs = [_run(layer, call) for call in calls]
        self.outputs[stack] = outputs
        self.done[stack] += 1
        step.moments, step.converted, step.attention = {}, {}, {}  # the consumer may hold it while the next runs
        del calls, outputs, moments, attention  # the previous block's outputs go before the next step's forwards
        _free(layer, names)

    def _load_converted(self, layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Put a converted layer's projections, shaped as the source's (K/V repeated to its heads), into the
        block."""
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(layer.named_parameters()):  # a copy: setting a tensor replaces its parameter
            value = tensors.get(self.weights.find(prefix + name))
            if value is not None:
                set_module_tensor_to_device(layer, name, self.device, value=value.to(self.dtype))

    def _whole_model_moments(self, model_dir: Path, auto, bars: bool) -> dict[Key, InputMoments]:
        with loading_bars(bars):
            model = from_pretrained(auto, model_dir, dtype=self.dtype).to(self.device).eval()
        modules = {(i.attention, role, layer): block.get_submodule(name)
                   for i in self.recorded for layer, block in enumerate(model.get_submodule(i.stack))
                   for role, name in i.modules().items()}
        moments: dict[Key, InputMoments] = {}
        hooks = _record(modules, moments)
        try:
            for inputs in self.inputs:
                model(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return moments
