"""T5's span-corruption objective (Raffel et al., 2020, section 3.1.4), batched in torch.

A row of `raw_length` tokens is split into alternating kept and noise spans (it starts with a kept span and ends with
a noise span). The encoder input keeps the kept tokens and puts one sentinel in place of each noise span; the target
lists each sentinel followed by the tokens it hid. Both end with eos:

    row      a b c d e f g h i           noise spans: [c d], [h i]
    input    a b <s0> e f g <s1> eos
    target   <s0> c d <s1> h i eos

Every row has the same span counts, so a batch of rows gives fixed-length inputs and targets with no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpanCounts:
    raw_length: int  # tokens of text per row
    noise_tokens: int
    noise_spans: int

    @property
    def input_length(self) -> int:  # kept tokens + one sentinel per span + eos
        return self.raw_length - self.noise_tokens + self.noise_spans + 1

    @property
    def target_length(self) -> int:  # one sentinel per span + hidden tokens + eos
        return self.noise_tokens + self.noise_spans + 1


def span_counts(raw_length: int, noise_density: float, mean_span_length: float) -> SpanCounts:
    """How many tokens and spans a row of `raw_length` tokens hides (T5's rounding: at least one of each)."""
    noise_tokens = min(max(round(raw_length * noise_density), 1), raw_length - 1)
    noise_spans = max(round(noise_tokens / mean_span_length), 1)
    return SpanCounts(raw_length, noise_tokens, noise_spans)


def counts_for_input_length(input_length: int, noise_density: float, mean_span_length: float) -> SpanCounts:
    """The longest rows whose corrupted input fits `input_length` tokens (T5's `compute_input_and_target_lengths`)."""
    if input_length < 3:
        raise ValueError(f"an input of {input_length} tokens cannot hold a kept token, a sentinel and eos")
    raw = 2
    while span_counts(raw + 1, noise_density, mean_span_length).input_length <= input_length:
        raw += 1
    return span_counts(raw, noise_density, mean_span_length)


def _random_segmentation(rows: int, items: int, segments: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, segments) lengths: `items` split into `segments` non-empty parts at random, independently per row."""
    if segments == 1:
        return torch.full((rows, 1), items, dtype=torch.long)
    # choose segments - 1 of the items - 1 gaps between items as cuts
    order = torch.rand(rows, items - 1, generator=generator).argsort(dim=1)  # (rows, items-1)
    cuts = order < segments - 1
    first_in_segment = torch.cat([torch.zeros(rows, 1, dtype=torch.long), cuts.long()], dim=1)  # (rows, items)
    segment_of_item = first_in_segment.cumsum(dim=1)  # (rows, items), values in [0, segments)
    lengths = torch.zeros(rows, segments, dtype=torch.long)
    return lengths.scatter_add_(1, segment_of_item, torch.ones_like(segment_of_item))


def noise_mask(rows: int, counts: SpanCounts, generator: torch.Generator) -> torch.Tensor:
    """(rows, raw_length) bool, True on noise tokens: kept and noise spans alternate, starting with a kept span."""
    kept = _random_segmentation(rows, counts.raw_length - counts.noise_tokens, counts.noise_spans, generator)
    noise = _random_segmentation(rows, counts.noise_tokens, counts.noise_spans, generator)
    lengths = torch.stack([kept, noise], dim=2).flatten(1)  # (rows, 2*spans): kept0, noise0, kept1, noise1, ...
    is_noise = torch.arange(lengths.shape[1]) % 2 == 1  # (2*spans,)
    return torch.repeat_interleave(is_noise.repeat(rows), lengths.flatten()).view(rows, counts.raw_length)


def _replace_spans(ids: torch.Tensor, spans: torch.Tensor, sentinels: torch.Tensor) -> torch.Tensor:
    """Each run of True in `spans` (rows, L) becomes the next sentinel; other tokens stay. Rows must shrink evenly."""
    starts = spans & ~torch.nn.functional.pad(spans[:, :-1], (1, 0))  # (rows, L): first token of each span
    span_index = starts.long().cumsum(dim=1) - 1  # (rows, L): which span a start opens
    marked = torch.where(starts, sentinels[span_index.clamp(min=0)], ids)
    keep = ~spans | starts
    return marked[keep].view(ids.shape[0], -1)  # (rows, L - hidden tokens)


def corrupt(ids: torch.Tensor, counts: SpanCounts, sentinels: torch.Tensor, eos_id: int,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Inputs (rows, input_length) and targets (rows, target_length) of rows `ids` (rows, raw_length)."""
    rows = ids.shape[0]
    mask = noise_mask(rows, counts, generator)  # (rows, raw_length)
    eos = torch.full((rows, 1), eos_id, dtype=ids.dtype)
    inputs = torch.cat([_replace_spans(ids, mask, sentinels), eos], dim=1)  # noise spans -> sentinels
    targets = torch.cat([_replace_spans(ids, ~mask, sentinels), eos], dim=1)  # kept spans -> sentinels
    return {"input_ids": inputs, "labels": targets}
