"""The ablation recipe: which original checkpoint, which cells (methods x groups x fractions), how to uptrain and
measure them. Typed and frozen; unknown keys are errors and every problem is reported at once."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gqa_toolkit.errors import ConversionError
from gqa_toolkit.convert.methods.variants import parse_variant
from gqa_toolkit.uptrain.shipped_recipes import resolve_recipe
from gqa_toolkit.uptrain.recipe import (DataSection, ModelOptions, ObjectiveSection, TrainOptions, describe_problems,
                                        read_recipe_yaml)

from .errors import EvalError
from .speed import DECODE_LOOPS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BuildOriginal(_Section):
    """A small MHA llama trained here from scratch on the recipe's data: the 'original checkpoint'."""

    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(8, ge=1)
    intermediate_size: int = Field(688, ge=1)
    max_position_embeddings: int = Field(512, ge=2)
    tokenizer_documents: int = Field(400, ge=1, description="training files used to learn the tokenizer")
    steps: int = Field(1000, ge=1, description="pretraining steps; recorded as original_steps")
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = Field(0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> BuildOriginal:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}")
        return self


class OriginalSection(_Section):
    path: str | None = Field(None, description="an existing MHA checkpoint (local dir, or hub id when online)")
    original_steps: int | None = Field(None, ge=1, description="its pretraining steps, for fraction x steps")
    build: BuildOriginal | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> OriginalSection:
        if (self.path is None) == (self.build is None):
            raise ValueError("give exactly one of original.path (with original.original_steps) or original.build")
        if self.path is not None and self.original_steps is None:
            raise ValueError("original.path needs original.original_steps, the steps it was pretrained for")
        return self


class SpeedSection(_Section):
    contexts: tuple[int, ...] = (128, 512)
    batch_sizes: tuple[int, ...] = (1, 8)
    decode_steps: int = Field(16, ge=1)
    repeats: int = Field(3, ge=1)
    decode: tuple[str, ...] = Field(("dynamic", "static"), min_length=1,
                                    description=f"decode loops, each measured: {', '.join(DECODE_LOOPS)}")

    @field_validator("decode")
    @classmethod
    def _known_loops(cls, loops: tuple[str, ...]) -> tuple[str, ...]:
        bad = [loop for loop in loops if loop not in DECODE_LOOPS]
        if bad:
            raise ValueError(f"decode loop {bad[0]!r} is unknown; choose from {', '.join(DECODE_LOOPS)}")
        return loops

    @field_validator("contexts", "batch_sizes")
    @classmethod
    def _positive(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if not values or any(v < 1 for v in values):
            raise ValueError(f"give one or more positive integers, e.g. [128, 512] (got {list(values)})")
        return values


class TasksSection(_Section):
    """lm-eval tasks each cell (and the original) is scored on after its uptraining (the `tasks` extra)."""

    names: tuple[str, ...] = Field((), description="lm-eval task names: its own, the shipped python_next_line, or "
                                                   "ones in include_path")
    limit: int | None = Field(None, ge=1, description="examples per task [default: all]")
    include_path: tuple[str, ...] = Field((), description="folders of lm-eval task YAML files of your own")
    batch_size: int = Field(16, ge=1)


class AblationRecipe(_Section):
    results_dir: str
    original: OriginalSection
    methods: tuple[str, ...] = Field(("mean", "first", "random"), min_length=1)
    groups: tuple[int, ...] = Field((1,), min_length=1)
    fractions: tuple[float, ...] = Field((0.0, 0.05), min_length=1)
    seed: int = 0
    data: DataSection = DataSection()
    uptrain: TrainOptions = Field(TrainOptions(), description="train.* keys of the uptrain recipe, but the budget: "
                                                              "each cell uptrains fraction x original_steps")
    objective: ObjectiveSection = ObjectiveSection()
    model: ModelOptions = Field(ModelOptions(), description="model.* keys of the uptrain recipe, but path")
    push_to_hub: str | None = Field(None, description="after the run, upload the best cell's model (lowest held-out "
                                                      "loss) to this hub repository")
    private: bool = Field(False, description="with push_to_hub: create the repository private")
    launcher: str | None = Field(None, description="e.g. 'accelerate launch --config_file fsdp.yaml': run each "
                                                   "uptraining in that launcher instead of in this process")
    eval_batch_size: int = Field(16, ge=1)
    speed: SpeedSection = SpeedSection()
    tasks: TasksSection = TasksSection()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        for method in methods:  # a registered method, optionally with options: aligned+similarity+norm
            try:
                parse_variant(method)
            except ConversionError as exc:
                raise ValueError(str(exc)) from None
        return methods

    @field_validator("launcher")
    @classmethod
    def _launcher_command(cls, launcher: str | None) -> str | None:
        if launcher is None:
            return None
        try:
            words = shlex.split(launcher)
        except ValueError as exc:
            raise ValueError(f"launcher {launcher!r} is not a command line ({exc}); write e.g. 'accelerate launch "
                             f"--config_file fsdp.yaml'") from None
        if not words:
            raise ValueError("launcher is empty; remove it to uptrain in this process")
        return launcher

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, fractions: tuple[float, ...]) -> tuple[float, ...]:
        bad = [f for f in fractions if not 0 <= f <= 1]
        if bad:
            raise ValueError(f"fraction {bad[0]} is outside [0, 1]; 0 means no uptraining")
        return fractions

    @field_validator("groups")
    @classmethod
    def _positive_groups(cls, groups: tuple[int, ...]) -> tuple[int, ...]:
        if any(g < 1 for g in groups):
            raise ValueError("every entry of groups must be a positive number of KV heads")
        return groups

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_ablation_recipe(path: str | Path, overrides: list[str] = ()) -> AblationRecipe:
    raw = read_recipe_yaml(resolve_recipe(path), overrides, example="recipes/tiny-ablation.yaml")
    try:
        return AblationRecipe.model_validate(raw)
    except ValidationError as exc:
        raise EvalError(describe_problems(f"recipe {path}", exc)) from None
