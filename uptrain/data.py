"""Training data: tokenize texts, pack them into fixed-length blocks, cache the blocks, and serve global batches.

A global batch (all processes, all accumulation micro-steps) is a pure function of (seed, step), so a resumed run
and a run on a different number of processes see exactly the same sequences at every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from . import corpus
from .errors import UptrainError
from .recipe import DataSection
from .sources import TextSource, load_text

PACK_FORMAT = "v1"  # bump when packing changes, so old caches are not reused
_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


@dataclass(frozen=True)
class Blocks:
    train: datasets.Dataset | datasets.IterableDataset  # one column, input_ids, block_size tokens per row
    heldout: torch.Tensor  # (N_eval, T) int64


def cache_root(cfg: DataSection) -> Path:
    default = Path(os.environ.get("GQA_TOOLKIT_CACHE", Path.home() / ".cache" / "gqa_toolkit")) / "blocks"
    return Path(cfg.cache_dir) if cfg.cache_dir else default


def _pack(batch: dict, tokenizer: PreTrainedTokenizerBase, column: str, block_size: int) -> dict:
    """Tokenize documents, join them with eos, cut into blocks; the tail shorter than a block is dropped."""
    ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
    flat = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    n = len(flat) // block_size * block_size
    return {"input_ids": [flat[i : i + block_size] for i in range(0, n, block_size)]}


def _packed(ds, tokenizer, column: str, block_size: int):
    kwargs = {"fn_kwargs": {"tokenizer": tokenizer, "column": column, "block_size": block_size},
              "batched": True, "batch_size": 256, "remove_columns": [column]}  # sources keep only this column
    if isinstance(ds, datasets.Dataset):
        kwargs.update(features=_FEATURES, desc="tokenizing and packing")
    return ds.map(_pack, **kwargs)


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def packed_blocks(src: TextSource, tokenizer, block_size: int, cfg: DataSection, main_first=contextlib.nullcontext):
    """Blocks of `src`: from the cache when this (text, tokenizer, block size) was packed before, else packed now.

    Streaming sources are packed on the fly and never cached.
    """
    with main_first():
        ds, text_fp = load_text(src)
        if src.streaming:
            return _packed(ds, tokenizer, src.text_column, block_size)
        key = hashlib.sha1(f"{PACK_FORMAT}|{text_fp}|{_tokenizer_fingerprint(tokenizer)}|{block_size}".encode())
        path = cache_root(cfg) / key.hexdigest()[:20]
        if not path.exists():
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            packed = _packed(ds, tokenizer, src.text_column, block_size)
            if len(packed) == 0:  # datasets cannot reload a saved dataset with no rows
                raise UptrainError(f"{src.name} (split {src.split}) gives no block of {block_size} tokens; give "
                                   f"more text or a smaller block size")
            packed.save_to_disk(str(tmp))
            with contextlib.suppress(OSError):  # another run may have finished the same cache first
                tmp.rename(path)
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(path))


def load_blocks(cfg: DataSection, tokenizer, main_first=contextlib.nullcontext) -> Blocks:
    """Training blocks and held-out blocks as the recipe's data section asks for them."""
    def source(name: str, split: str, streaming: bool) -> TextSource:
        return TextSource(name, split, cfg.config, cfg.text_column, cfg.max_documents, streaming)

    train = packed_blocks(source(cfg.source, cfg.split, cfg.streaming), tokenizer, cfg.block_size, cfg, main_first)
    if cfg.eval_source or cfg.eval_split or cfg.source == corpus.NAME:
        name = cfg.eval_source or cfg.source
        split = cfg.eval_split or ("heldout" if name == corpus.NAME else cfg.split)
        held = packed_blocks(source(name, split, False), tokenizer, cfg.block_size, cfg, main_first)
        held_rows = held.select(range(min(cfg.eval_blocks, len(held))))["input_ids"]
    elif cfg.streaming:  # no held-out split: the first eval_blocks blocks of the stream are held out
        held_rows = [row["input_ids"] for row in train.take(cfg.eval_blocks)]
        train = train.skip(cfg.eval_blocks)
    else:
        n = min(cfg.eval_blocks, len(train) // 2)
        held_rows = train.select(range(n))["input_ids"]
        train = train.select(range(n, len(train)))
    if cfg.eval_blocks and not len(held_rows):
        raise UptrainError(f"no held-out block of {cfg.block_size} tokens; give data.eval_source or lower "
                           "data.block_size, or set data.eval_blocks=0")
    heldout = torch.tensor(list(held_rows), dtype=torch.long).view(-1, cfg.block_size)  # (N_eval, T)
    return Blocks(train=train, heldout=heldout)


def global_batches(train, batch_size: int, seed: int, start_step: int = 0,
                   shuffle_buffer: int = 10_000) -> Iterator[torch.Tensor]:
    """Yield the global batches (B, T) of steps start_step, start_step + 1, ... forever (epochs reshuffle)."""
    if isinstance(train, datasets.Dataset):
        n = len(train)
        per_epoch = n // batch_size
        if per_epoch == 0:
            raise UptrainError(f"the data holds {n} blocks, fewer than one batch of {batch_size}; add data or "
                               "lower train.batch_size or data.block_size")
        rows = train.with_format("torch")
        step = start_step
        while True:
            epoch, k = divmod(step, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            yield rows[perm[k * batch_size : (k + 1) * batch_size].tolist()]["input_ids"].long()
            step += 1
    # streaming: the order is (seed, epoch)-deterministic, so resuming skips the blocks already consumed
    skip, buf, epoch = start_step * batch_size, [], 0
    while True:
        stream = train.shuffle(seed=seed, buffer_size=shuffle_buffer)
        stream.set_epoch(epoch)
        seen = 0
        for row in stream:
            seen += 1
            if skip:
                skip -= 1
                continue
            buf.append(row["input_ids"])
            if len(buf) == batch_size:
                yield torch.tensor(buf, dtype=torch.long)  # (B, T)
                buf = []
        if seen == 0:
            raise UptrainError("the training stream is empty; check data.source and data.block_size")
        epoch += 1


def process_micro_batches(batch: torch.Tensor, num_processes: int, rank: int, micro: int) -> list[torch.Tensor]:
    """This process's micro-batches of a global batch (B, T): micro-step m takes rows [(m*P + r)*mb, +mb)."""
    accum = batch.shape[0] // (num_processes * micro)
    return [batch[(m * num_processes + rank) * micro : (m * num_processes + rank + 1) * micro] for m in range(accum)]

