"""The ablation's original checkpoint: an existing MHA model, or a small one trained here from scratch.

Building one trains a byte-level BPE tokenizer and a random MHA llama, then pretrains it with the same Accelerate
loop that uptrains converted models, so the original and its uptrained conversions see one training code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from gqa_toolkit.model_dir import resolve_model_dir
from gqa_toolkit.output_dir import atomic_directory
from gqa_toolkit.uptrain import train, validate_recipe
from gqa_toolkit.corpus import NAME as STDLIB
from gqa_toolkit.corpus import iter_texts
from gqa_toolkit.model_dir import ModelDir, checkpoint_problem
from gqa_toolkit.uptrain.tokenizer import train_tokenizer

from .ablation_recipe import AblationRecipe, BuildOriginal
from .errors import EvalError
from .outputs import disk_writes, write_files
from .results_dir import DESTINATION

DONE_MARKER = ".original-complete"


@dataclass(frozen=True)
class Original:
    path: Path
    original_steps: int

    @cached_property
    def dir(self) -> ModelDir:
        """The original as a model folder (its config and tokenizer read once)."""
        return ModelDir(self.path, "original.path", EvalError)


def _tokenizer_texts(recipe: AblationRecipe, build: BuildOriginal):
    if recipe.data.source != STDLIB:
        raise EvalError("original.build learns its tokenizer from the built-in python-stdlib corpus; set "
                        "data.source: python-stdlib, or give original.path")
    return (record["text"] for record in iter_texts("train", limit=build.tokenizer_documents))


def new_tokenizer(recipe: AblationRecipe, build: BuildOriginal):
    """A byte-level BPE tokenizer learnt from the corpus's training files."""
    return train_tokenizer(_tokenizer_texts(recipe, build), vocab_size=build.vocab_size)


def original_config(build: BuildOriginal, tokenizer=None):
    """The config of the MHA llama that `build` describes, with the tokenizer's vocabulary and special tokens
    (None: the vocabulary size `build` asks for, before the tokenizer is trained)."""
    from transformers import LlamaConfig

    special = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(
        vocab_size=build.vocab_size if tokenizer is None else len(tokenizer), hidden_size=build.hidden_size,
        intermediate_size=build.intermediate_size, num_hidden_layers=build.num_layers,
        num_attention_heads=build.num_heads, num_key_value_heads=build.num_heads,
        max_position_embeddings=build.max_position_embeddings, tie_word_embeddings=True, **special)


def write_initial_model(directory: Path, build: BuildOriginal, tokenizer) -> None:
    """A random MHA llama with the given tokenizer, saved as a Hugging Face model directory that appears whole or
    not at all."""
    from transformers import LlamaForCausalLM

    config = original_config(build, tokenizer)
    torch.manual_seed(build.seed)
    model = LlamaForCausalLM(config)
    with disk_writes(directory, DESTINATION), atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def build_original(recipe: AblationRecipe, root: Path, progress: bool = True, tokenizer=None) -> Original:
    build = recipe.original.build
    out = root / "original"
    if (out / DONE_MARKER).is_file():
        return Original(out, build.steps)
    init = root / "original-init"
    if not (init / "config.json").is_file():
        write_initial_model(init, build, tokenizer or new_tokenizer(recipe, build))
    pretrain = validate_recipe({
        "model": {"path": str(init)},
        "data": recipe.data.model_dump(mode="json"),
        "train": {"max_steps": build.steps, "batch_size": build.batch_size, "micro_batch_size": build.micro_batch_size,
                  "lr": build.lr, "warmup_fraction": build.warmup_fraction, "schedule": "cosine",
                  "seed": build.seed, "weight_decay": 0.1},
        "output": {"dir": str(out), "save_every": max(1, build.steps // 4), "keep_last": 1,
                   "progress_label": "pretraining the original",
                   "eval_every": max(1, build.steps // 4), "progress": progress, "trackers": []},
    }, name="original.build")
    train(pretrain)
    write_files({out / DONE_MARKER: f"{build.steps}\n"}, DESTINATION)
    return Original(out, build.steps)


def resolve_original(recipe: AblationRecipe, root: Path, progress: bool = True, tokenizer=None) -> Original:
    if recipe.original.build is not None:
        return build_original(recipe, root, progress, tokenizer)
    path = resolve_model_dir(recipe.original.path, error=EvalError, role="original.path: ")
    problem = checkpoint_problem(path)
    if problem:
        raise EvalError(f"original.path {path} {problem}; set original.path to the MHA checkpoint to convert, or "
                        f"use original.build to train one here")
    return Original(path, recipe.original.original_steps)
