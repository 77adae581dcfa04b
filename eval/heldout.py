"""Held-out evaluation examples: the same data options and tasks as uptrain, made with the model's tokenizer and
cached. A causal LM is scored on packed blocks; an encoder-decoder on span corruption (or pairs) of them."""

from __future__ import annotations

import torch

from gqa_toolkit.uptrain.corpora import CorpusSettings, TextCorpus
from gqa_toolkit.uptrain.data import heldout_examples, task_rows
from gqa_toolkit.uptrain.errors import UptrainError
from gqa_toolkit.uptrain.recipe import DataSection, ObjectiveSection
from gqa_toolkit.uptrain.tasks import Task, build_task

from .errors import EvalError

HELDOUT = DataSection(split="heldout")  # the built-in corpus's held-out files, 64 blocks of 256 tokens


def eval_task(config, tokenizer, data: DataSection, objective: ObjectiveSection = ObjectiveSection(),
              settings: CorpusSettings = CorpusSettings()) -> Task:
    """The uptrain task this model is scored on: `objective.task` (default: the model's own kind's)."""
    try:
        return build_task(objective, data, config, tokenizer, settings)
    except UptrainError as e:
        raise EvalError(str(e)) from None


def heldout_set(tokenizer, data: DataSection, task: Task,
                settings: CorpusSettings = CorpusSettings()) -> dict[str, torch.Tensor]:
    """The task's examples of up to `data.eval_blocks` rows of `data.split` (column -> (N, ...)); an empty set is
    an error."""
    src = TextCorpus(data.source, data.split, data.config, data.text_column, data.max_documents, streaming=False,
                     target_column=data.target_column, settings=settings)
    try:
        rows = task_rows(src, tokenizer, task, data)
    except UptrainError as e:
        raise EvalError(str(e)) from None
    examples = heldout_examples(rows.select(range(min(len(rows), data.eval_blocks)))[:], task)
    if not examples:
        raise EvalError(f"the held-out data ({data.source}, split {data.split}) gives no block of {task.row_length} "
                        f"tokens; give more text or a smaller block size")
    return examples
