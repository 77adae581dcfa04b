"""The uptrain recipe: typed, frozen sections validated with pydantic, loaded from YAML plus `key=value` overrides.

Unknown keys are errors, and every problem in a recipe is reported at once with the bad value and what was expected.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gqa_toolkit.model_dir import is_hub_id

from .errors import UptrainError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelOptions(_Section):
    """How the model trains, whichever model it is (the ablation gives these for every cell)."""

    trainable: Literal["auto", "all", "attention", "converted", "kv"] = Field(
        "auto", description="converted: the attention modules of the kinds gqa-convert changed (from the record "
        "in config.json); auto: converted for speech models (whisper; attention without a record), all for the "
        "rest")
    gradient_checkpointing: bool = False
    trust_remote_code: bool = Field(False, description="run the Python files of the model folders (never needed "
                                    "for the toolkit's own families, which load through its registered classes)")


class ModelSection(ModelOptions):
    path: str = Field(description="converted checkpoint to uptrain (the output of gqa-convert)")


class DataSection(_Section):
    source: str = Field("python-stdlib", description="'python-stdlib', a local file or folder, or a hub dataset")
    config: str | None = None
    split: str = "train"
    eval_source: str | None = None
    eval_split: str | None = None
    text_column: str = Field("text", description="the text (causal_lm, span_corruption) or the inputs (seq2seq)")
    target_column: str | None = Field(None, description="seq2seq only: the column holding each input's target")
    block_size: int = Field(256, ge=2, description="tokens per block; for encoder-decoders, per encoder input")
    target_length: int = Field(128, ge=2, description="seq2seq and speech: target tokens (truncated or padded to "
                                                      "it)")
    audio_column: str = Field("audio", description="speech: the column naming each clip's audio file (a dataset's "
                                                   "Audio column, or a transcripts file's file column)")
    language: str | None = Field(None, description="speech: the transcripts' language, for a multilingual "
                                                   "whisper's language token (e.g. en)")
    eval_blocks: int = Field(64, ge=0)
    max_documents: int | None = Field(None, ge=1)
    streaming: bool = False
    shuffle_buffer: int = Field(10_000, ge=1)
    cache_dir: str | None = None


class TrainOptions(_Section):
    """How to train, apart from how long (the ablation sets the budget of each cell)."""

    batch_size: int = Field(32, ge=1, description="sequences per optimizer step, over all processes")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward pass on one process")
    lr: float = Field(1e-4, gt=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = Field(0.02, ge=0, lt=1)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = Field(0, ge=0, lt=2**32, description="numpy's seeds run from 0 to 2**32 - 1")
    encoder_cache_mib: int = Field(2048, ge=0, description="encoder-decoders whose encoder does not train: MiB of "
                                   "encoder states kept per process across steps (0: recomputed every step)")


class TrainSection(TrainOptions):
    fraction: float = Field(0.05, gt=0, le=1)
    original_steps: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSection:
        given = [k for k in ("original_steps", "max_steps", "max_tokens") if getattr(self, k) is not None]
        if not given:
            raise ValueError(
                "no way to compute the step budget: set train.original_steps (uptrains fraction x original_steps), "
                "train.max_steps or train.max_tokens"
            )
        if len(given) > 1:
            raise ValueError(f"set only one of train.original_steps, train.max_steps, train.max_tokens (got {given}); "
                             "remove the others (a budget key=value override replaces the recipe's own budget)")
        return self


class ObjectiveSection(_Section):
    task: Literal["auto", "causal_lm", "span_corruption", "seq2seq", "speech"] = Field(
        "auto", description="auto: causal_lm for decoder-only models; for encoder-decoders span_corruption, or "
                            "seq2seq when data.target_column is set; speech (audio, transcript) pairs for whisper")
    noise_density: float = Field(0.15, gt=0, lt=1, description="span_corruption: fraction of tokens hidden")
    mean_noise_span_length: float = Field(3.0, ge=1, description="span_corruption: mean tokens per hidden span")
    distill_weight: float = Field(0.0, ge=0, le=1, description="w in (1 - w) * CE + w * T^2 * KL(teacher||student)")
    temperature: float = Field(1.0, gt=0)
    teacher: str | None = Field(None, description="default: the source recorded in config.json gqa_conversion")


class OutputSection(_Section):
    dir: str
    save_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    trackers: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] | None = Field(
        None, description="experiment trackers, through accelerate (logs in output.dir/trackers); default: "
                          "tensorboard when it is installed, else none. The JSONL metrics log is always written")
    progress: bool = True
    progress_label: str = Field("uptrain", description="what the progress bar calls the run")
    push_to_hub: str | None = Field(None, description="after training, upload the final model to this hub "
                                                      "repository (created if new)")
    private: bool = Field(False, description="with push_to_hub: create the repository private")

    @model_validator(mode="after")
    def _private_needs_a_push(self) -> OutputSection:
        if self.private and not self.push_to_hub:
            raise ValueError("private applies to output.push_to_hub; set push_to_hub to a repository, or drop private")
        return self


class Recipe(_Section):
    model: ModelSection
    data: DataSection = DataSection()
    train: TrainSection
    objective: ObjectiveSection = ObjectiveSection()
    output: OutputSection

    def resolved(self) -> Recipe:
        """The same recipe with its paths made absolute, so the saved copy means the same thing from any folder."""

        def absolute(p: str | None) -> str | None:
            return None if p is None else str(Path(p).expanduser().resolve())

        def local(p: str | None) -> str | None:  # a data source may be a hub name; only rewrite existing paths
            return absolute(p) if p is not None and Path(p).expanduser().exists() else p

        def model(p: str | None) -> str | None:  # a model may be a hub id, resolved when the run starts
            return p if p is not None and is_hub_id(p) else absolute(p)

        return self.model_copy(
            update={
                "model": self.model.model_copy(update={"path": model(self.model.path)}),
                "data": self.data.model_copy(
                    update={
                        "source": local(self.data.source),
                        "eval_source": local(self.data.eval_source),
                        "cache_dir": absolute(self.data.cache_dir),
                    }
                ),
                "objective": self.objective.model_copy(update={"teacher": model(self.objective.teacher)}),
                "output": self.output.model_copy(update={"dir": absolute(self.output.dir)}),
            }
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


BUDGET_KEYS = ("original_steps", "max_steps", "max_tokens")


MAX_YAML_NODES = 100_000  # a recipe has a few dozen; an alias bomb has billions once its aliases are expanded
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to part of a line, in bounded time whatever the value's size (messages quote user values)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_load_yaml(text: str, what: str) -> Any:
    """`yaml.safe_load`, refusing a document whose aliases expand to more than MAX_YAML_NODES nodes (`what` names
    the document in the error)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    sizes: dict[int, int] = {}

    def expanded(n: yaml.Node) -> int:  # each distinct node counted once, shared ones (aliases) at full size
        if id(n) not in sizes:
            sizes[id(n)] = 1  # a recursive alias counts once
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            sizes[id(n)] = min(1 + sum(expanded(c) for c in children), MAX_YAML_NODES + 1)
        return sizes[id(n)]

    if expanded(node) > MAX_YAML_NODES:
        raise UptrainError(f"{what} expands to more than {MAX_YAML_NODES:,} values through its YAML aliases (*name); "
                           "write the values out instead of repeating anchors")
    return yaml.SafeLoader(text).get_single_data()


def yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found wrong, and where, in one line."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _override_value(item: str, value: str) -> Any:
    try:
        return safe_load_yaml(value, f"override {item!r}")
    except yaml.YAMLError as e:
        raise UptrainError(f"override {item!r}: the value {value!r} is not valid YAML ({yaml_problem(e)}); write a "
                           "number, true/false, null, a complete [list] or a quoted string, e.g. train.lr=3e-4"
                           ) from None


def parse_overrides(overrides: list[str]) -> list[tuple[str, list[str], Any]]:
    """`a.b=value` overrides as (the override as written, ['a', 'b'], value parsed as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UptrainError(f"override {item!r} is not key=value; write e.g. train.lr=3e-4")
        parsed.append((item, key.split("."), _override_value(item, value)))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (each parsed once, its value as YAML) to a nested dict, returning a new dict. A
    step budget given as an override (train.max_steps=5) replaces the budget the recipe sets
    (train.original_steps), instead of clashing with it."""
    parsed = parse_overrides(list(overrides))
    out = yaml.safe_load(yaml.safe_dump(_budget_overrides_win(raw, parsed)))  # deep copy
    for item, (*parents, leaf), value in parsed:
        node = out
        for part in parents:
            if node.get(part) is None:  # a missing section, or an empty one (`train:` in YAML)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UptrainError(f"override {item!r}: {part} is not a section; write section.key=value")
        node[leaf] = value
    return out


def _budget_overrides_win(raw: dict[str, Any], parsed: list[tuple[str, list[str], Any]]) -> dict[str, Any]:
    given = {keys[1] for _, keys, value in parsed
             if len(keys) == 2 and keys[0] == "train" and keys[1] in BUDGET_KEYS and value is not None}
    if not given or not isinstance(raw.get("train"), dict):
        return raw
    return {**raw, "train": {k: v for k, v in raw["train"].items() if k not in BUDGET_KEYS or k in given}}


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "recipe"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key (got {short(err['input'])}); remove it or fix its spelling"
    if err["type"] == "missing":
        return f"{where}: missing required key"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # our cross-field checks carry their own wording
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {short(err['input'])})"


def describe_problems(name: str, error: ValidationError) -> str:
    """Every problem pydantic found, one per line, each with the bad value and what was expected."""
    problems = [_describe(err) for err in error.errors()]
    if len(problems) == 1:
        return f"{name}: {problems[0]}"
    return f"{name} has {len(problems)} problems:\n  " + "\n  ".join(problems)


def validate_recipe(raw: Any, name: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise UptrainError(f"{name} must be a YAML mapping of sections (model, data, train, objective, output)")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UptrainError(describe_problems(name, e)) from None


def read_recipe_yaml(path: str | Path, overrides: list[str] = (), example: str = "recipes/tiny-uptrain.yaml") -> dict:
    """A recipe file as a mapping with `key=value` overrides applied; a missing file or bad YAML is an UptrainError."""
    path = Path(path)
    if path.is_dir():
        raise UptrainError(f"recipe {path} is a directory; pass a YAML file such as {example}")
    if not path.is_file():
        raise UptrainError(f"recipe {path} does not exist; pass a YAML file such as {example}, or the name of a "
                           f"shipped recipe (gqa-uptrain --list)")
    try:
        raw = safe_load_yaml(path.read_text(), f"recipe {path}") or {}
    except yaml.YAMLError as e:
        raise UptrainError(f"recipe {path} is not valid YAML ({yaml_problem(e)}); fix that line") from None
    except RecursionError:
        raise UptrainError(f"recipe {path} nests its values too deeply to read; a recipe has two levels: "
                           "section, then key") from None
    except UnicodeDecodeError as e:
        raise UptrainError(f"recipe {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UptrainError(f"cannot read recipe {path} ({e.strerror}); check its permissions") from None
    if not isinstance(raw, dict):
        raise UptrainError(f"recipe {path} must be a YAML mapping of sections")
    return apply_overrides(raw, list(overrides))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a YAML recipe. Paths are left as written; call `.resolved()` to anchor them."""
    return validate_recipe(read_recipe_yaml(path, overrides), name=f"recipe {path}")
