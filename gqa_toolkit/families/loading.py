"""Loading a checkpoint with transformers without running Python from its folder.

A converted directory of a family the toolkit models itself (t5, bart, whisper, gpt2, ...) carries modeling files
and an `auto_map` so that it loads where the toolkit is not installed. Whoever made a folder controls those files
and its `model_type`, so every stage loads the toolkit's own families through the classes the toolkit registers with
the Auto classes, with `trust_remote_code=False`. A folder's code runs only after `allow_remote_code()`, which the
commands call for an explicit `--trust-remote-code` (gqa-eval) or `model.trust_remote_code: true` (gqa-uptrain
recipes).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ConversionError
from .config import TransformersConfig

_remote_code_allowed = False


def allow_remote_code(allowed: bool = True) -> None:
    """Let later loads run the Python files of model folders (the user asked for it), and say so once."""
    global _remote_code_allowed
    if allowed and not _remote_code_allowed:
        print("trust_remote_code is on: the Python files in model folders will run, including the modeling files "
              "the toolkit writes for the families it models itself (t5, bart, whisper, gpt2, ...)", file=sys.stderr)
    _remote_code_allowed = allowed


def remote_code_allowed() -> bool:
    return _remote_code_allowed


def own_model_types() -> set[str]:
    """The model types the toolkit has modeling code for (gqa_t5, gqa_opt, ...)."""
    from .spec import all_specs

    return {spec.modeling.model_type for spec in all_specs().values() if spec.modeling is not None}


def register_own_modeling(model_dir: str | Path) -> None:
    """Register the toolkit's classes when `model_dir` holds one of its own families; a no-op otherwise (and for
    hub ids, whose config.json is not on disk yet)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, OSError, AttributeError):
        return  # the caller's from_pretrained reports the unreadable config
    if model_type in own_model_types():
        from . import modeling  # noqa: F401  registers the GQA classes with the Auto classes


def from_pretrained(auto_class, model_dir: str | Path, **kwargs):
    """`auto_class.from_pretrained(model_dir, **kwargs)` with the toolkit's families registered, or, after
    `allow_remote_code()`, with the folder's own code (transformers prefers registered classes to a folder's)."""
    if not _remote_code_allowed:
        register_own_modeling(model_dir)
    if _loads_a_model(auto_class):
        # transformers 5.25 swaps layers for kernels fetched from the hub unless told not to: the toolkit runs
        # transformers' own torch code, the code its parity tests and measurements are made with
        kwargs.setdefault("use_kernels", False)
    return auto_class.from_pretrained(model_dir, trust_remote_code=_remote_code_allowed, **kwargs)


def _loads_a_model(auto_class) -> bool:
    """A model class or an AutoModel* class (not a config, tokenizer or feature extractor)."""
    from transformers import PreTrainedModel

    return hasattr(auto_class, "_model_mapping") or (isinstance(auto_class, type)
                                                      and issubclass(auto_class, PreTrainedModel))


def load_transformers_config(model_dir: Path) -> TransformersConfig:
    from huggingface_hub.errors import StrictDataclassError  # a value of the wrong type, or one out of range
    from transformers import AutoConfig

    from .spec import all_specs

    try:
        config = from_pretrained(AutoConfig, model_dir)
    except (ValueError, OSError, TypeError, StrictDataclassError) as exc:
        reason = " ".join(str(exc).split())
        raise ConversionError(f"transformers cannot read {model_dir / 'config.json'}: {reason}") from None
    # the spec's fallback chains (a cross-attention count that is None reads the decoder's, as the modeling does)
    spec = all_specs().get(config.model_type)
    return TransformersConfig(config, spec.config.keys if spec is not None else None)


@contextmanager
def loading_bars(shown: bool) -> Iterator[None]:
    """transformers' "Loading weights" bars on or off while loading (off under a command's -q)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    if not shown:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            logging.enable_progress_bar()
