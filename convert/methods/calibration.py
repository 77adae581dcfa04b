"""Calibration text: a few hundred token sequences whose activations weigh the layer methods' errors (the moments
themselves come from convert/methods/block_stream.py, which runs the source one block at a time).

Text comes from the built-in `python-stdlib` corpus (its training files only, so held-out text never calibrates), from a file or folder of text files, or as token
ids given directly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gqa_toolkit import corpus
from ..errors import ConversionError, first_line
from gqa_toolkit.families.loading import from_pretrained

BUILTIN = corpus.NAME


def _text_files(source: str) -> list[Path]:
    if source == BUILTIN:
        return corpus.stdlib_files("train")
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".py", ".md", ".jsonl"))
        if files:
            return files
    raise ConversionError(f"calibration source {source!r} is neither {BUILTIN!r} nor a text file or a folder "
                          f"holding .txt/.py/.md files; pass --calibration {BUILTIN}, a path, or none")


def calibration_tokens(model_dir: Path, source: str, samples: int, length: int) -> torch.Tensor:
    """`(samples, length)` token ids: documents spread over the source packed end to end (with the tokenizer's
    end-of-text between them) into full rows; each file read once."""
    from transformers import AutoTokenizer

    fix = "add the source's tokenizer files, or pass --calibration none to convert on the weights only"
    try:
        tokenizer = from_pretrained(AutoTokenizer, model_dir)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"calibration needs the source's tokenizer, and {model_dir} has none that loads "
                              f"({first_line(exc)}); {fix}") from None
    probe = tokenizer("def calibrate(text): return text.split()", add_special_tokens=False)["input_ids"]
    if len(set(probe) - set(tokenizer.all_special_ids)) < 3:
        # transformers builds an empty tokenizer for a folder without vocabulary files: text comes out as nothing,
        # unknown tokens or bare word boundaries, where a real tokenizer gives a dozen distinct pieces
        raise ConversionError(f"the tokenizer in {model_dir} has no vocabulary (it turns text into nothing or into "
                              f"special tokens only); {fix}")
    files = _text_files(source)
    step = max(1, len(files) // samples)
    spread = files[::step]
    chosen = set(spread)
    order = spread + [f for f in files if f not in chosen]  # every file at most once: no window counted twice
    quota = -(-samples * length // len(spread))  # tokens per file, so the rows come from many files
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows: list[list[int]] = []
    packed: list[int] = []  # documents packed end to end into full rows, never padded or truncated to fit
    for f in order:
        if len(rows) >= samples:
            break
        try:
            ids = tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        except (UnicodeDecodeError, OSError):
            continue
        packed.extend(ids[:quota] + separator)
        while len(packed) >= length and len(rows) < samples:
            rows.append(packed[:length])
            del packed[:length]
    if not rows:
        raise ConversionError(f"calibration source {source!r} holds no text of {length} tokens; lower "
                              f"--calibration-length or give more text")
    return torch.tensor(rows[:samples])
