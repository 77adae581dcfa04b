"""The MHA source checkpoint that `fidelity` and `speed` compare a converted model with: `--source`, else the one
gqa-convert recorded in the converted model's config.json (gqa_conversion.source)."""

from __future__ import annotations

from pathlib import Path

from gqa_toolkit.model_dir import ModelDir

from .errors import EvalError

FIX = "pass --source MHA_DIR, the MHA checkpoint it was converted from"


def source_dir(model: ModelDir, given: str | None, required: bool = True) -> ModelDir | None:
    """The checked source checkpoint of the converted `model`; None when none is given, none is recorded and
    `required` is false."""
    return model.source(given, "--source", FIX, required)


def check_comparable(config, source: ModelDir) -> None:
    """Fidelity compares the two models' distributions token by token: they must be of one kind and vocabulary."""
    source_config, source = source.config, source.path
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


def unrecorded_source(model: ModelDir, source: ModelDir) -> str | None:
    """A warning when --source is not the source gqa-convert recorded in `model` (still there), else None."""
    recorded = model.recorded_source
    if not recorded or not Path(recorded).is_dir() or Path(recorded).resolve() == source.path:
        return None
    return (f"--source {source.path} is not the source recorded in {model.path / 'config.json'} ({recorded}); KL is "
            "measured against the --source given")
