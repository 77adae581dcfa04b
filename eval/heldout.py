"""Held-out evaluation blocks: the same data options as uptrain, packed with the model's tokenizer and cached."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa_toolkit.uptrain.data import packed_blocks
from gqa_toolkit.uptrain.model import context_length
from gqa_toolkit.uptrain.recipe import DataSection
from gqa_toolkit.uptrain.sources import TextSource

from .errors import EvalError


@dataclass(frozen=True)
class EvalData:
    source: str = "python-stdlib"
    split: str = "heldout"
    config: str | None = None
    text_column: str = "text"
    block_size: int = 256
    max_blocks: int = 64
    max_documents: int | None = None
    cache_dir: str | None = None


def check_context(config, block_size: int) -> None:
    limit = context_length(config)
    if limit is not None and block_size > limit:
        raise EvalError(f"block size {block_size} is longer than the model's context of {limit} tokens; "
                        f"use a block size of at most {limit}")


def heldout_blocks(tokenizer, data: EvalData) -> torch.Tensor:
    """(N, T) token ids, N <= data.max_blocks, T = data.block_size; an empty set is an error."""
    src = TextSource(data.source, data.split, data.config, data.text_column, data.max_documents, streaming=False)
    blocks = packed_blocks(src, tokenizer, data.block_size, DataSection(cache_dir=data.cache_dir))
    n = min(len(blocks), data.max_blocks)
    if n == 0:
        raise EvalError(f"the held-out data ({data.source}, split {data.split}) gives no block of {data.block_size} "
                        f"tokens; give more text or a smaller block size")
    return torch.tensor(blocks.select(range(n))["input_ids"], dtype=torch.long).view(n, data.block_size)
