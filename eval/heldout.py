"""Held-out evaluation examples: the same data options and tasks as uptrain, made with the model's tokenizer and
cached. A causal LM is scored on packed blocks; an encoder-decoder on span corruption (or pairs) of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqa_toolkit.uptrain.data import heldout_examples, task_rows
from gqa_toolkit.uptrain.errors import UptrainError
from gqa_toolkit.uptrain.recipe import DataSection, ObjectiveSection
from gqa_toolkit.uptrain.corpora import TextCorpus
from gqa_toolkit.uptrain.tasks import Task, build_task

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
    target_column: str | None = None
    target_length: int = 128


def eval_task(config, tokenizer, data: EvalData, objective: ObjectiveSection = ObjectiveSection()) -> Task:
    """The uptrain task this model is scored on: `objective.task` (default: the model's own kind's)."""
    section = DataSection(block_size=data.block_size, target_column=data.target_column,
                          target_length=data.target_length)
    try:
        return build_task(objective, section, config, tokenizer)
    except UptrainError as e:
        raise EvalError(str(e)) from None


def heldout_set(tokenizer, data: EvalData, task: Task) -> dict[str, torch.Tensor]:
    """The task's examples of up to data.max_blocks held-out rows (column -> (N, ...)); an empty set is an error."""
    src = TextCorpus(data.source, data.split, data.config, data.text_column, data.max_documents, streaming=False,
                     target_column=data.target_column)
    try:
        rows = task_rows(src, tokenizer, task, DataSection(cache_dir=data.cache_dir))
    except UptrainError as e:
        raise EvalError(str(e)) from None
    examples = heldout_examples(rows.select(range(min(len(rows), data.max_blocks)))[:], task)
    if not examples:
        raise EvalError(f"the held-out data ({data.source}, split {data.split}) gives no block of {task.row_length} "
                        f"tokens; give more text or a smaller block size")
    return examples
