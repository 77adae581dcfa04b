"""A frozen encoder's states, computed once and shared: an encoder-decoder whose encoder does not train (whisper
converted at the default scope trains its decoder's attention only) needs no encoder backward pass, and its encoder
gives every example the same states at every step.

So the training step runs the encoder once per micro-batch under no_grad and hands its states to the student and,
when the teacher's encoder holds the same weights (checked once, tensor by tensor), to the teacher as
`encoder_outputs=`. The states are also kept, per example, up to a memory budget (`train.encoder_cache_mib`, per
process), so later epochs skip the encoder; past the budget they are recomputed. An example is known by the bytes
of its encoder inputs, so a task that makes new inputs every step (span corruption) never hits a stale entry.

The encoder runs in eval mode (no dropout): frozen, it is a fixed feature extractor.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

MIB = 2**20


def _encoder(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_encoder", None)
    return get() if getattr(model.config, "is_encoder_decoder", False) and callable(get) else None


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


class EncoderStates:
    """Shared (and cached) encoder states of a frozen encoder; `inputs` rewrites a micro-batch for the student and
    the teacher."""

    def __init__(self, encoder: nn.Module, share_with_teacher: bool, budget_mib: int,
                 autocast=contextlib.nullcontext):
        self.encoder = encoder
        self.share_with_teacher = share_with_teacher
        self.budget = budget_mib * MIB
        self.autocast = autocast
        # the batch columns the encoder reads (input_features; input_ids and attention_mask for a text encoder)
        self.reads = set(inspect.signature(encoder.forward).parameters)
        self.cache: dict[bytes, torch.Tensor] = {}
        self.cached_bytes = 0
        self.hits = self.misses = 0

    @classmethod
    def for_run(cls, model: nn.Module, teacher: nn.Module | None, budget_mib: int, *, sharded: bool = False,
                autocast=contextlib.nullcontext) -> EncoderStates | None:
        """The sharing for this (unwrapped) student, or None where it does not apply: not an encoder-decoder,
        an encoder parameter trains, or the model is sharded (FSDP gathers the encoder inside the model's
        forward only)."""
        encoder = _encoder(model)
        if encoder is None or sharded or any(p.requires_grad for p in encoder.parameters()):
            return None
        teacher_encoder = _encoder(teacher) if teacher is not None else None
        share = teacher_encoder is not None and _same_weights(encoder, teacher_encoder)
        return cls(encoder, share, budget_mib, autocast)

    def _keys(self, inputs: dict[str, torch.Tensor]) -> list[bytes]:
        """One key per example: a digest of its encoder inputs (column, shape, dtype and bytes)."""
        rows = len(next(iter(inputs.values())))
        keys = []
        for i in range(rows):
            digest = hashlib.sha1()
            for column in sorted(inputs):
                row = inputs[column][i].detach().contiguous().cpu()
                digest.update(f"{column}|{tuple(row.shape)}|{row.dtype}".encode())
                digest.update(row.view(torch.uint8).numpy().tobytes() if row.numel() else b"")
            keys.append(digest.digest())
        return keys

    @torch.no_grad()
    def _compute(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with self.autocast():
                return self.encoder(**inputs, return_dict=True).last_hidden_state  # (b, positions, d)
        finally:
            self.encoder.train(was_training)

    def states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's last hidden states (b, positions, d) for these inputs: cached rows from the cache, the
        others computed in one encoder call (and cached while the budget lasts)."""
        if self.budget == 0:
            return self._compute(inputs)
        keys = self._keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            index = torch.tensor(missing, device=next(iter(inputs.values())).device)
            computed = self._compute({c: v.index_select(0, index) for c, v in inputs.items()})  # (m, positions, d)
            for i, row in zip(missing, computed, strict=True):
                fresh[i] = row
                size = row.numel() * row.element_size()
                if self.cached_bytes + size <= self.budget:
                    self.cache[keys[i]] = row.detach().to("cpu", copy=True)
                    self.cached_bytes += size
        device = next(iter(inputs.values())).device
        return torch.stack([fresh[i] if i in fresh else self.cache[k].to(device) for i, k in enumerate(keys)])

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(the student's batch, the teacher's): the encoder's inputs replaced by its states (`encoder_outputs`);
        the attention mask stays, for the decoder's cross-attention. The teacher keeps its own inputs when its
        encoder differs."""
        encoder_inputs = {k: v for k, v in batch.items() if k in self.reads}
        outputs = BaseModelOutput(last_hidden_state=self.states(encoder_inputs))
        student = {k: v for k, v in batch.items() if k not in self.reads or k == "attention_mask"}
        student["encoder_outputs"] = outputs
        return student, (student if self.share_with_teacher else batch)
