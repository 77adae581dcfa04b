"""Loading what the loop trains and learns from: the converted student, its tokenizer, and the source teacher.
Decoder-only models load with their causal-LM head, encoder-decoders (T5) with their seq2seq head."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from gqa_toolkit.convert.errors import first_line
from gqa_toolkit.convert.families.geometry import check_context
from gqa_toolkit.convert.families.loading import from_pretrained
from gqa_toolkit.convert.families.spec import audio_input, lm_auto_class_name
from gqa_toolkit.convert.io.model_dir import is_hub_id, resolve_model_dir
from gqa_toolkit.convert.io.records import CONVERSION_KEY

from .errors import UptrainError

WEIGHT_FILES = ("*.safetensors", "*.bin")
CONVERTED = "a converted checkpoint (the output of gqa-convert)"
TEACHER = "the MHA source checkpoint that model.path was converted from"


def check_model_dir(path: str | Path, role: str = "model.path", wanted: str = CONVERTED) -> Path:
    """The model directory at `path` (a hub id resolves through the hub cache or the network), or a one-line error
    saying why it is not one and to pass `wanted`."""
    if is_hub_id(path):
        path = resolve_model_dir(path, error=UptrainError, role=f"{role}: ")
    path = Path(path).expanduser()
    problem = checkpoint_problem(path)
    if problem:
        raise UptrainError(f"{role}: {path} {problem}; pass {wanted}")
    return path.resolve()


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a model checkpoint, or None when it is one."""
    if not path.exists():
        return "is missing"
    if not path.is_dir():
        return "is a file, not a model directory"
    if not (path / "config.json").is_file():
        return "has no config.json"
    if not any(any(path.glob(p)) for p in WEIGHT_FILES):
        return "holds no weights (*.safetensors or *.bin)"
    return None


def read_config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def load_config(path: Path, role: str = "model.path"):
    try:
        config = from_pretrained(AutoConfig, path)
    except (ValueError, OSError, TypeError) as e:
        raise UptrainError(f"{role}: transformers cannot read {path / 'config.json'}: {first_line(e)}") from None
    return config


def check_block_size(config, block_size: int) -> None:
    check_context(config, block_size, "data.block_size", UptrainError)


def load_tokenizer(path: Path):
    try:
        tokenizer = from_pretrained(AutoTokenizer, path)
    except (ValueError, OSError, TypeError) as e:
        raise UptrainError(f"{path} has no usable tokenizer ({first_line(e)}); copy the source model's "
                           "tokenizer files into it") from None
    if tokenizer.eos_token_id is None:
        raise UptrainError(f"the tokenizer in {path} has no eos token, which packing puts between documents; set "
                           "eos_token in its tokenizer_config.json")
    return tokenizer


def check_tokenizer_fits(tokenizer, config, path: Path) -> None:
    """Refuse a tokenizer with ids the model has no embedding for: they would fail in the middle of a step."""
    vocab_size = getattr(config, "vocab_size", None)
    ids = max(tokenizer.get_vocab().values(), default=-1) + 1
    if isinstance(vocab_size, int) and ids > vocab_size:
        raise UptrainError(f"the tokenizer in {path} has {ids} token ids but the model's vocab_size is {vocab_size}, "
                           f"so ids {vocab_size} and up have no embedding; put the tokenizer the model was trained "
                           "with (the source checkpoint's tokenizer files) in model.path")


def example_length(config, block_size: int) -> int:
    """Positions per example as the budget counts them: the text block (checked against the model's context), or
    for a model whose encoder takes audio (whisper), its window of encoder positions."""
    audio = audio_input(config.model_type)
    if audio is not None:
        return getattr(config, audio.positions_attr)
    check_block_size(config, block_size)
    return block_size


def check_text_model(config) -> None:
    """Refuse a model whose encoder takes audio (whisper) where only text can feed it (lm-eval's tasks)."""
    if audio_input(config.model_type) is not None:
        raise UptrainError(f"this {config.model_type} model's encoder takes audio features, and these tasks are "
                           "text; score it on (audio, transcript) pairs with gqa-eval wer, perplexity or fidelity")


def model_class(path: Path):
    """The Auto class with the language-model head: seq2seq for encoder-decoders (T5), speech seq2seq for whisper,
    causal for the rest."""
    import transformers

    config = load_config(path)
    return getattr(transformers, lm_auto_class_name(config.model_type, getattr(config, "is_encoder_decoder", False)))


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    try:
        return from_pretrained(model_class(path), path, dtype=dtype)
    except (ValueError, OSError) as e:
        raise UptrainError(f"transformers cannot load the model in {path}: {first_line(e)}") from None


def teacher_dir(student_dir: Path, override: str | None) -> Path:
    """The distillation teacher: the recipe's objective.teacher, else the source recorded by gqa-convert."""
    if override is not None:
        return check_model_dir(override, role="objective.teacher", wanted=TEACHER)
    record = read_config_json(student_dir).get(CONVERSION_KEY)
    if not record or not record.get("source"):
        raise UptrainError(f"{student_dir} records no conversion source ({CONVERSION_KEY}.source in config.json); "
                           f"set objective.teacher to {TEACHER}")
    return check_model_dir(record["source"], role=f"teacher ({CONVERSION_KEY}.source in {student_dir / 'config.json'})",
                           wanted=f"{TEACHER} as objective.teacher")


def load_teacher(path: Path, student_config, dtype: torch.dtype):
    teacher = load_model(path, dtype).eval().requires_grad_(False)
    if teacher.config.vocab_size != student_config.vocab_size:
        raise UptrainError(f"teacher {path} has vocab_size {teacher.config.vocab_size} but the student has "
                           f"{student_config.vocab_size}; distill from the checkpoint the student was converted from")
    return teacher
