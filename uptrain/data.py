"""Training data: tokenize texts into the task's rows (packed blocks or pairs), cache them, and serve global batches.

A global batch (all processes, all accumulation micro-steps) is a pure function of (seed, step), so a resumed run
and a run on a different number of processes see exactly the same sequences at every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from gqa_toolkit import corpus
from .errors import UptrainError, first_line
from .recipe import DataSection
from .corpora import TextCorpus, load_text
from .storage import disk_writes
from .tasks import Task

PACK_FORMAT = "v1"  # bump when packing changes, so old caches are not reused
HELDOUT_SEED = 1_000_003  # held-out examples are made once, with this seed, so every evaluation sees the same ones
log = logging.getLogger("gqa_toolkit.uptrain")


@dataclass(frozen=True)
class Blocks:
    train: datasets.Dataset | datasets.IterableDataset  # rows of the task's columns (input_ids: row_length tokens)
    heldout: dict[str, torch.Tensor]  # the task's examples, each tensor (N_eval, ...)


def cache_root(cfg: DataSection) -> Path:
    default = Path(os.environ.get("GQA_TOOLKIT_CACHE", Path.home() / ".cache" / "gqa_toolkit")) / "blocks"
    return Path(cfg.cache_dir) if cfg.cache_dir else default


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def task_rows(src: TextCorpus, tokenizer, task: Task, cfg: DataSection, main_first=contextlib.nullcontext):
    """Rows of `src` as `task` stores them: from the cache when this (text, tokenizer, row format) was made before,
    else made now. Streaming sources are tokenized on the fly and never cached."""
    if task.name == "speech":
        return speech_rows(src, tokenizer, task, cfg, main_first)
    with main_first():
        ds, text_fp = load_text(src)
        if src.streaming:
            return task.rows(ds, tokenizer, src.text_column)
        key = hashlib.sha1(f"{PACK_FORMAT}|{text_fp}|{_tokenizer_fingerprint(tokenizer)}|{task.format_key}".encode())
        path = cache_root(cfg) / key.hexdigest()[:20]
        cached = _read_cache(path)
        if cached is None:
            rows = task.rows(ds, tokenizer, src.text_column)
            if len(rows) == 0:  # datasets cannot reload a saved dataset with no rows
                raise UptrainError(f"{src.name} (split {src.split}) gives no block of {task.row_length} tokens; give "
                                   f"more text or a smaller block size")
            _write_cache(rows, path)
            cached = datasets.load_from_disk(str(path))
        return cached


def speech_rows(src: TextCorpus, tokenizer, task, cfg: DataSection, main_first=contextlib.nullcontext):
    """(features, transcript) rows of a speech corpus: from the cache when these clips, tokenizer and feature
    extractor made them before, else made now (each clip decoded, resampled and turned into log-mel features)."""
    from .speech_corpus import SpeechCorpus, speech_clips

    if src.name == corpus.NAME:
        raise UptrainError(f"this model's encoder takes audio, and {corpus.NAME} is text; set {src.settings.source} "
                           "to (audio, transcript) pairs: a csv or jsonl transcripts file beside wav/flac files, a "
                           "folder holding them, or a dataset with audio and text columns")
    with main_first():
        speech = SpeechCorpus(src.name, src.split, src.config, src.text_column, cfg.audio_column, src.max_documents,
                              src.settings)
        clips, clips_fp = speech_clips(speech)
        key = hashlib.sha1(f"{clips_fp}|{_tokenizer_fingerprint(tokenizer)}|{task.format_key}".encode())
        path = cache_root(cfg) / key.hexdigest()[:20]
        cached = _read_cache(path)
        if cached is None:
            rows = task.rows(clips, tokenizer)
            if len(rows) == 0:
                raise UptrainError(f"{src.name} holds no (audio, transcript) pair; give some clips")
            _write_cache(rows, path)
            cached = datasets.load_from_disk(str(path))
        return cached


def _read_cache(path: Path) -> datasets.Dataset | None:
    """The cached rows at `path`; None when there are none, or when they are damaged (then removed, to be rebuilt)."""
    if not path.exists():
        return None
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:  # a truncated arrow file: pyarrow's ArrowInvalid (a ValueError) or OSError
        log.warning(f"the block cache {path} is damaged ({first_line(e)}); deleted it and rebuilding it")
        shutil.rmtree(path, ignore_errors=True)
        return None


def _write_cache(rows: datasets.Dataset, path: Path) -> None:
    """Save rows to `path` whole or not at all: into a temporary sibling, renamed into place."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with disk_writes(path, "the block cache", "data.cache_dir", cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        rows.save_to_disk(str(tmp))
    with contextlib.suppress(OSError):  # another run may have finished the same cache first
        tmp.rename(path)
    shutil.rmtree(tmp, ignore_errors=True)


def rows_as_tensors(rows) -> dict[str, torch.Tensor]:
    """A list of row dicts, or a dict of column lists, as a dict of tensors (N, ...): int64 ids, float32 features."""
    if isinstance(rows, list):
        rows = {k: [row[k] for row in rows] for k in rows[0]} if rows else {"input_ids": []}
    return {k: _tensor(v) for k, v in rows.items()}


def _tensor(values) -> torch.Tensor:
    """Token ids as int64, audio features as float32."""
    array = np.asarray(values if isinstance(values, torch.Tensor) else list(values))
    return torch.from_numpy(array).float() if array.dtype.kind == "f" else torch.tensor(array, dtype=torch.long)


def example_batches(examples: dict[str, torch.Tensor], batch_size: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive slices (column -> (b, ...)) of a set of examples, on `device`."""
    n = len(next(iter(examples.values()))) if examples else 0
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size].to(device) for k, v in examples.items()}


def heldout_examples(rows, task: Task) -> dict[str, torch.Tensor]:
    """The task's examples of held-out rows, made with a fixed seed; {} when there are none."""
    tensors = rows_as_tensors(rows)
    return task.examples(tensors, HELDOUT_SEED) if len(next(iter(tensors.values()))) else {}


def load_blocks(cfg: DataSection, tokenizer, task: Task, main_first=contextlib.nullcontext) -> Blocks:
    """Training rows and held-out examples as the recipe's data section asks for them."""
    def source(name: str, split: str, streaming: bool) -> TextCorpus:
        return TextCorpus(name, split, cfg.config, cfg.text_column, cfg.max_documents, streaming, cfg.target_column)

    train = task_rows(source(cfg.source, cfg.split, cfg.streaming), tokenizer, task, cfg, main_first)
    if cfg.eval_source or cfg.eval_split or cfg.source == corpus.NAME:
        name = cfg.eval_source or cfg.source
        split = cfg.eval_split or ("heldout" if name == corpus.NAME else cfg.split)
        held = task_rows(source(name, split, False), tokenizer, task, cfg, main_first)
        held_rows = held.select(range(min(cfg.eval_blocks, len(held))))[:]
    elif cfg.streaming:  # no held-out split: the first eval_blocks rows of the stream are held out
        held_rows = list(train.take(cfg.eval_blocks))
        train = train.skip(cfg.eval_blocks)
    else:
        n = min(cfg.eval_blocks, len(train) // 2)
        held_rows = train.select(range(n))[:]
        train = train.select(range(n, len(train)))
    heldout = heldout_examples(held_rows, task)
    if cfg.eval_blocks and not heldout:
        raise UptrainError(f"no held-out block of {task.row_length} tokens; give data.eval_source or lower "
                           "data.block_size, or set data.eval_blocks=0")
    return Blocks(train=train, heldout=heldout)


def global_batches(train, batch_size: int, seed: int, start_step: int = 0,
                   shuffle_buffer: int = 10_000) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the global batches of rows (column -> (B, ...)) of steps start_step, start_step + 1, ... forever
    (epochs reshuffle)."""
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
            batch = rows[perm[k * batch_size : (k + 1) * batch_size].tolist()]
            yield {column: values if values.is_floating_point() else values.long() for column, values in batch.items()}
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
            buf.append(row)
            if len(buf) == batch_size:
                yield rows_as_tensors(buf)  # column -> (B, ...)
                buf = []
        if seen == 0:
            raise UptrainError("the training stream is empty; check data.source and data.block_size")
        epoch += 1


def process_micro_batches(batch: dict[str, torch.Tensor], num_processes: int, rank: int,
                          micro: int) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of a global batch (column -> (B, ...)): micro-step m takes rows
    [(m*P + r)*mb, +mb)."""
    rows = len(next(iter(batch.values())))
    accum = rows // (num_processes * micro)
    starts = [(m * num_processes + rank) * micro for m in range(accum)]
    return [{column: values[a : a + micro] for column, values in batch.items()} for a in starts]
