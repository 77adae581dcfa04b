"""Calibration activations: the second moment of every layer's attention input, from a forward pass of the
source model over a few hundred text sequences.

Text comes from the built-in `python-stdlib` corpus (training files only: the same path-hash split as
gqa_toolkit.uptrain.corpus, so held-out text never calibrates), from a file or folder of text files, or as token
ids given directly. Only moments are kept, `(d + 1, d + 1)` per layer; the model is freed afterwards.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

from .architectures.spec import AttentionBlock, key_pattern
from .errors import ConversionError
from .layer_block import InputMoments
from .loading import from_pretrained

BUILTIN = "python-stdlib"
HELDOUT_PERCENT = 5  # must equal gqa_toolkit.uptrain.corpus.HELDOUT_PERCENT (a test checks the split agrees)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_train_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        if int(hashlib.sha1(rel.as_posix().encode()).hexdigest(), 16) % 100 >= HELDOUT_PERCENT:
            files.append(f)
    return files


def _text_files(source: str) -> list[Path]:
    if source == BUILTIN:
        return stdlib_train_files()
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
    """`(samples, length)` token ids: one window from each of `samples` files spread over the source."""
    from transformers import AutoTokenizer

    try:
        tokenizer = from_pretrained(AutoTokenizer, model_dir)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"calibration needs the source's tokenizer, and {model_dir} has none that loads "
                              f"({exc}); add one, or pass --calibration none to fit on weights only") from None
    files = _text_files(source)
    rows: list[list[int]] = []
    step = max(1, len(files) // samples)
    for f in files[::step] + files:  # a second pass through all files if the spread ones ran short
        if len(rows) >= samples:
            break
        try:
            ids = tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        except (UnicodeDecodeError, OSError):
            continue
        rows.extend(ids[i:i + length] for i in range(0, len(ids) - length + 1, length * 8))
    if not rows:
        raise ConversionError(f"calibration source {source!r} holds no text of {length} tokens; lower "
                              f"--calibration-length or give more text")
    return torch.tensor(rows[:samples])


@torch.no_grad()
def collect_moments(model_dir: Path, block: AttentionBlock, tokens: torch.Tensor, batch_size: int = 8) -> dict[int, InputMoments]:
    """Layer -> moments of the input to its query projection, from the source model run on `tokens`."""
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, model_dir, dtype=torch.float32).eval()
    patterns = [key_pattern(t) for t in block.q]
    moments: dict[int, InputMoments] = {}
    hooks = []
    for name, module in model.named_modules():
        m = next((m for p in patterns if (m := p.match(name))), None)
        if m is None or not isinstance(module, torch.nn.Linear):
            continue
        layer = int(m["layer"])
        moments[layer] = InputMoments(module.in_features)
        hooks.append(module.register_forward_pre_hook(lambda mod, args, i=layer: moments[i].add(args[0])))
    if not moments:
        raise ConversionError(f"no module of {model_dir} matches the family's query projection {block.q}; "
                              f"calibration cannot see the attention inputs")
    vocab = model.get_input_embeddings().num_embeddings
    if tokens.max() >= vocab:
        raise ConversionError(f"calibration token id {int(tokens.max())} is outside the model's vocabulary of "
                              f"{vocab}")
    for start in range(0, len(tokens), batch_size):
        model(input_ids=tokens[start:start + batch_size])
    for hook in hooks:
        hook.remove()
    return moments
