"""What a model learns from its data: the next token (causal LMs), T5's span corruption, or input -> target pairs.

A task decides how texts become stored rows (packed blocks, or tokenized pairs) and how a batch of rows becomes the
model's inputs. Every batch it makes is a dict of tensors; the loss reads `labels` when there are any (the decoder of
an encoder-decoder predicts them), else the next token of `input_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from .corpora import CorpusSettings
from .errors import UptrainError
from .recipe import DataSection, ObjectiveSection
from .span_corruption import SpanCounts, corrupt, counts_for_input_length

IGNORE = -100  # target positions the loss skips (padding of a pair's target)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pack(batch: dict, tokenizer, column: str, block_size: int) -> dict:
    """Tokenize documents, join them with eos, cut into blocks; the tail shorter than a block is dropped."""
    ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
    flat = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    n = len(flat) // block_size * block_size
    return {"input_ids": [flat[i : i + block_size] for i in range(0, n, block_size)]}


@dataclass(frozen=True)
class CausalLM:
    """Packed blocks of `block_size` tokens; each position predicts the next."""

    row_length: int  # the block size
    name: str = "causal_lm"

    @property
    def format_key(self) -> str:
        return f"packed|{self.row_length}"

    def rows(self, ds, tokenizer, column: str):
        return _map(ds, pack, {"tokenizer": tokenizer, "column": column, "block_size": self.row_length}, [column],
                    datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}))

    def examples(self, rows: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        return {"input_ids": rows["input_ids"]}


@dataclass(frozen=True)
class SpanCorruption:
    """Packed blocks of raw text, corrupted per batch (a fresh noise mask for every step, fixed by the seed)."""

    counts: SpanCounts
    sentinels: tuple[int, ...]
    eos_id: int
    decoder_start_id: int
    name: str = "span_corruption"

    @property
    def row_length(self) -> int:
        return self.counts.raw_length

    @property
    def format_key(self) -> str:
        return f"packed|{self.row_length}"  # the same blocks a causal LM of this length packs

    def rows(self, ds, tokenizer, column: str):
        return CausalLM(self.row_length).rows(ds, tokenizer, column)

    def examples(self, rows: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        batch = corrupt(rows["input_ids"], self.counts, torch.tensor(self.sentinels), self.eos_id, _generator(seed))
        return {**batch, "decoder_input_ids": shift_right(batch["labels"], self.decoder_start_id)}


@dataclass(frozen=True)
class Seq2SeqPairs:
    """One (input, target) pair per row, each truncated and padded to a fixed length."""

    row_length: int  # tokens of each input
    target_length: int
    target_column: str
    eos_id: int
    pad_id: int
    decoder_start_id: int
    name: str = "seq2seq"

    @property
    def format_key(self) -> str:
        return f"pairs|{self.row_length}|{self.target_length}|{self.target_column}"

    def _fixed(self, ids: list[int], length: int, fill: int) -> list[int]:
        ids = [*ids[: length - 1], self.eos_id]
        return ids + [fill] * (length - len(ids))

    def _tokenize(self, batch: dict, tokenizer, column: str) -> dict:
        sources = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        targets = tokenizer(batch[self.target_column], add_special_tokens=False)["input_ids"]
        return {
            "input_ids": [self._fixed(s, self.row_length, self.pad_id) for s in sources],
            "attention_mask": [[1] * min(len(s) + 1, self.row_length) + [0] * max(self.row_length - len(s) - 1, 0)
                               for s in sources],
            "labels": [self._fixed(t, self.target_length, IGNORE) for t in targets],
        }

    def rows(self, ds, tokenizer, column: str):
        ids = datasets.Sequence(datasets.Value("int32"))
        features = datasets.Features({"input_ids": ids, "attention_mask": ids, "labels": ids})
        return _map(ds, self._tokenize, {"tokenizer": tokenizer, "column": column}, [column, self.target_column],
                    features)

    def examples(self, rows: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        return {**rows, "decoder_input_ids": shift_right(rows["labels"], self.decoder_start_id, self.pad_id)}


Task = CausalLM | SpanCorruption | Seq2SeqPairs


def _map(ds, fn, fn_kwargs: dict, remove: list[str], features: datasets.Features):
    kwargs = {"fn_kwargs": fn_kwargs, "batched": True, "batch_size": 256, "remove_columns": remove}
    if isinstance(ds, datasets.Dataset):
        kwargs.update(features=features, desc="tokenizing")
    return ds.map(fn, **kwargs)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int = 0) -> torch.Tensor:
    """Decoder inputs (b, T) for targets (b, T): start token, then the targets but the last (ignored ones as pad)."""
    shifted = torch.cat([torch.full_like(labels[:, :1], start_id), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE, pad_id)


def sentinel_ids(tokenizer, needed: int, settings: CorpusSettings = CorpusSettings()) -> tuple[int, ...]:
    """The ids of <extra_id_0>, <extra_id_1>, ...: T5 tokenizers carry 100 of them."""
    vocab = tokenizer.get_vocab()
    found = [vocab[f"<extra_id_{i}>"] for i in range(needed) if f"<extra_id_{i}>" in vocab]
    if len(found) < needed:
        fewer = f"lower {settings.block_size}" + (f" or {settings.noise_density}" if settings.noise_density else "")
        raise UptrainError(f"span corruption hides {needed} spans per row but the tokenizer has {len(found)} sentinel "
                           f"tokens (<extra_id_0>, <extra_id_1>, ...); use a T5 tokenizer"
                           + (f", {fewer}," if found else "") + f" or score (input, target) pairs with "
                           f"{settings.target_column}")
    return tuple(found)


def resolve_task_name(objective: ObjectiveSection, data: DataSection, config) -> str:
    """objective.task, with 'auto' made concrete, checked against the model's kind (decoder-only or not)."""
    from gqa_toolkit.families.spec import audio_input

    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    name = objective.task
    speech = audio_input(config.model_type) is not None
    if speech or name == "speech":
        return _speech_task_name(name, speech, data, config)
    if name == "auto":
        name = ("seq2seq" if data.target_column else "span_corruption") if encoder_decoder else "causal_lm"
    if encoder_decoder and name == "causal_lm":
        raise UptrainError(f"objective.task causal_lm needs a decoder-only model, but this {config.model_type} is an "
                           "encoder-decoder; use objective.task span_corruption (or seq2seq with data.target_column)")
    if not encoder_decoder and name != "causal_lm":
        raise UptrainError(f"objective.task {name} needs an encoder-decoder model such as T5, but this "
                           f"{config.model_type} is decoder-only; use objective.task causal_lm")
    if name == "seq2seq" and not data.target_column:
        raise UptrainError("objective.task seq2seq reads (input, target) pairs: set data.target_column to the column "
                           "holding the targets")
    if name != "seq2seq" and data.target_column:
        raise UptrainError(f"data.target_column is set but objective.task is {name}; use objective.task seq2seq, or "
                           "remove data.target_column")
    return name


def _speech_task_name(name: str, speech: bool, data: DataSection, config) -> str:
    """'speech' for a model whose encoder takes audio, which no text task fits (and the reverse)."""
    if not speech:
        raise UptrainError(f"objective.task speech needs a model whose encoder takes audio (whisper), but this "
                           f"{config.model_type} takes text; use objective.task auto")
    if name not in ("auto", "speech"):
        raise UptrainError(f"this {config.model_type} model's encoder takes audio, so objective.task {name} (text) "
                           "cannot feed it; use objective.task speech (or auto) with (audio, transcript) pairs")
    if data.target_column:
        raise UptrainError("data.target_column is for text pairs; speech reads each clip's transcript from "
                           "data.text_column and its audio from data.audio_column: remove data.target_column")
    return "speech"


def build_task(objective: ObjectiveSection, data: DataSection, config, tokenizer,
               settings: CorpusSettings = CorpusSettings()) -> Task:
    """The task the recipe asks for, fitted to this model and tokenizer (`settings`: how messages name the
    settings)."""
    name = resolve_task_name(objective, data, config)
    if name == "causal_lm":
        return CausalLM(data.block_size)
    if name == "speech":
        from .speech import speech_task

        return speech_task(config, tokenizer, data.target_length, data.language)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    start_id = getattr(config, "decoder_start_token_id", None)
    start_id = pad_id if start_id is None else start_id  # T5 starts decoding from pad
    if name == "seq2seq":
        return Seq2SeqPairs(data.block_size, data.target_length, data.target_column, tokenizer.eos_token_id, pad_id,
                            start_id)
    try:
        counts = counts_for_input_length(data.block_size, objective.noise_density, objective.mean_noise_span_length)
    except ValueError as e:
        raise UptrainError(f"{settings.block_size}: {e}; use a longer block") from None
    if counts.raw_length - counts.noise_tokens < counts.noise_spans:
        raise UptrainError(f"objective.noise_density {objective.noise_density} leaves fewer kept tokens than noise "
                           "spans; lower it (T5 uses 0.15)")
    return SpanCorruption(counts, sentinel_ids(tokenizer, counts.noise_spans, settings), tokenizer.eos_token_id,
                          start_id)
