"""The MHA source checkpoint that `fidelity` and `speed` compare a converted model with: `--source`, else the one
gqa-convert recorded in the converted model's config.json (gqa_conversion.source)."""

from __future__ import annotations

from pathlib import Path

from gqa_toolkit.convert.io.model_dir import is_hub_id, resolve_model_dir
from gqa_toolkit.uptrain.model import CONVERSION_KEY, checkpoint_problem, read_config_json

from .errors import EvalError

FIX = "pass --source MHA_DIR, the MHA checkpoint it was converted from"
FIX_GIVEN = "give --source the MHA checkpoint it was converted from"


def recorded_source(model_dir: Path) -> str | None:
    """The source path gqa-convert recorded in `model_dir`, if any."""
    record = read_config_json(model_dir).get(CONVERSION_KEY)
    return record.get("source") if isinstance(record, dict) else None


def source_dir(model_dir: Path, given: str | None, required: bool = True) -> Path | None:
    """The checked source checkpoint of the converted `model_dir`; None when none is given, none is recorded and
    `required` is false."""
    if given:
        if is_hub_id(given):
            given = str(resolve_model_dir(given, error=EvalError, role="--source: "))
        problem = checkpoint_problem(Path(given).expanduser())
        if problem:
            raise EvalError(f"--source {given} {problem}; {FIX_GIVEN}")
        return Path(given).expanduser().resolve()
    recorded = recorded_source(model_dir)
    if not recorded:
        if not required:
            return None
        raise EvalError(f"{model_dir} records no conversion source ({CONVERSION_KEY}.source in config.json); {FIX}")
    problem = checkpoint_problem(Path(recorded))
    if problem:
        raise EvalError(f"the MHA source checkpoint recorded by gqa-convert ({CONVERSION_KEY}.source in "
                        f"{model_dir / 'config.json'}), {recorded}, {problem}; {FIX}")
    return Path(recorded).resolve()


def check_comparable(config, source_config, source: Path) -> None:
    """Fidelity compares the two models' distributions token by token: they must be of one kind and vocabulary."""
    kinds = [("an encoder-decoder" if getattr(c, "is_encoder_decoder", False) else "a decoder-only model")
             for c in (config, source_config)]
    if kinds[0] != kinds[1]:
        raise EvalError(f"the source {source} is {kinds[1]} but MODEL_DIR is {kinds[0]}, so their predictions "
                        f"cannot be compared; {FIX}")
    if config.vocab_size != source_config.vocab_size:
        raise EvalError(f"the source {source} has vocab_size {source_config.vocab_size} but MODEL_DIR has "
                        f"{config.vocab_size}, so their predictions cannot be compared; {FIX}")
    for attr in SHAPES:  # conversion changes the KV heads only: every other shape is the source's
        ours, theirs = getattr(config, attr, None), getattr(source_config, attr, None)
        if ours is not None and theirs is not None and ours != theirs:
            raise EvalError(f"the source {source} has {attr} {theirs} but MODEL_DIR has {ours}: it is not the "
                            f"checkpoint MODEL_DIR was converted from; {FIX}")


SHAPES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def unrecorded_source(model_dir: Path, source: Path) -> str | None:
    """A warning when --source is not the source gqa-convert recorded in `model_dir` (still there), else None."""
    recorded = recorded_source(model_dir)
    if not recorded or not Path(recorded).is_dir() or Path(recorded).resolve() == source.resolve():
        return None
    return (f"--source {source} is not the source recorded in {model_dir / 'config.json'} ({recorded}); KL is "
            "measured against the --source given")
