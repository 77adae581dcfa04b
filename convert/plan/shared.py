"""A result that several output tensors share (a layer's converted projections, a stack of per-head norms):
computed on the first producer's call, handed out part by part, and freed once its last part has been taken, so
that streaming holds at most the groups the writer is in the middle of."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch


class SharedResult:
    def __init__(self, compute: Callable[[], dict[Hashable, torch.Tensor]], parts: Iterable[Hashable],
                 on_computed: Callable[[dict[Hashable, torch.Tensor]], None] | None = None):
        self.compute, self.on_computed = compute, on_computed
        self.outputs: dict[Hashable, torch.Tensor] | None = None
        self.pending = set(parts)  # parts not yet handed out

    def ensure(self) -> None:
        """Compute the result now, unless it was computed already or every part has been handed out."""
        if self.outputs is None and self.pending:
            self.outputs = self.compute()
            if self.on_computed is not None:
                self.on_computed(self.outputs)

    def producer(self, part: Hashable, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            self.ensure()
            out = self.outputs[part].to(dtype).contiguous()
            self.pending.discard(part)
            if not self.pending:
                self.outputs = None
            return out

        return produce
