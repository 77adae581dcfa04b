"""Shared fixtures: tiny random models saved to disk with stock transformers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from families import FAMILIES, family_config
from transformers import AutoConfig, AutoModelForCausalLM

pytest_plugins = ["fixtures_uptrain"]

# Where and in what dtype load_model and the decoding tests run the models: the CPU in float32 here; bench/gpu_check.py
# runs the parity and cached-decoding tests with GQA_TEST_DEVICE=cuda GQA_TEST_DTYPE=bfloat16.
TEST_DEVICE = torch.device(os.environ.get("GQA_TEST_DEVICE", "cpu"))
TEST_DTYPE = getattr(torch, os.environ.get("GQA_TEST_DTYPE", "float32"))
# bfloat16 keeps 8 significant bits (relative step 2**-8 = 0.4%): logits of the tiny models (|logit| < ~2) computed
# by two routes (cached and full, converted and reference) agree to about 1e-2 there
BF16_TOLERANCE = dict(rtol=2e-2, atol=2e-2)


def tolerance(rtol: float, atol: float) -> dict:
    """assert_close's tolerances: a test's own in float32, BF16_TOLERANCE in a lower precision."""
    return dict(rtol=rtol, atol=atol) if TEST_DTYPE == torch.float32 else BF16_TOLERANCE


def on_model(model, inputs: dict) -> dict:
    """`inputs` on the model's device, floating ones (audio features) in its dtype."""
    return {k: (v.to(model.device, model.dtype if v.is_floating_point() else v.dtype)
                if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


class _Deprecations(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "deprecat" in record.getMessage().lower():
            self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(autouse=True)
def fail_on_logged_deprecations():
    """transformers announces many renames through its logger, not the warnings module: fail on those too."""
    handler = _Deprecations()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    if handler.messages:
        pytest.fail("transformers logged a deprecation: " + handler.messages[0])


def build_tiny_model(model_type: str, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # some families initialise norms to exactly 1 and biases to 0: make every weight count
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_tiny_model(path: Path, model_type: str, config: dict, seed: int = 0, dtype=torch.float32,
                    **save_kwargs) -> Path:
    build_tiny_model(model_type, config, seed, dtype).save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny model per supported family, built once per session."""
    root = tmp_path_factory.mktemp("families")
    return {f.model_type: save_tiny_model(root / f.model_type, f.model_type, family_config(f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def llama_dir(family_dirs) -> Path:
    return family_dirs["llama"]


# a multilingual whisper's prompt tokens, given to the tiny whisper (its tokenizer has no whisper specials; the ids
# only have to be the ones the prompt and the language detection use)
WHISPER_LANGUAGES = {"<|en|>": 10, "<|de|>": 11}
WHISPER_TRANSCRIBE, WHISPER_NO_TIMESTAMPS = 12, 13


def make_multilingual(whisper_dir: Path, out: Path) -> Path:
    """A copy of a tiny whisper with a multilingual generation config: languages, the transcribe task, no
    timestamps."""
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(whisper_dir, out)
    generation = GenerationConfig.from_pretrained(out)
    generation.lang_to_id = WHISPER_LANGUAGES
    generation.task_to_id = {"transcribe": WHISPER_TRANSCRIBE, "translate": 14}
    generation.no_timestamps_token_id, generation.is_multilingual = WHISPER_NO_TIMESTAMPS, True
    generation._from_model_config = False  # else transformers reads back only what the model config holds
    generation.save_pretrained(out)
    return out


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def load_model(model_dir: Path):
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"stock transformers reports {problems} loading {model_dir}"
    return on_test_device(model).eval()


def toolkit_dir(model_dir: Path):
    """`model_dir` as the toolkit's stages read it (the kernel's ModelDir, unchecked: the tests made it)."""
    from gqa_toolkit.errors import ToolkitError
    from gqa_toolkit.model_dir import ModelDir

    return ModelDir(Path(model_dir), "MODEL_DIR", ToolkitError)


def toolkit_model(model_dir: Path):
    """The model with its language-model head, loaded as uptraining and evaluation load it."""
    return toolkit_dir(model_dir).model()


def toolkit_tokenizer(model_dir: Path):
    return toolkit_dir(model_dir).tokenizer


def toolkit_config(model_dir: Path):
    return toolkit_dir(model_dir).config


def on_test_device(model):
    """On GQA_TEST_DEVICE, and cast to GQA_TEST_DTYPE only when it is set: otherwise a model keeps the dtype its
    checkpoint loads in (a test may be checking exactly that)."""
    model = model.to(TEST_DEVICE)
    return model.to(TEST_DTYPE) if "GQA_TEST_DTYPE" in os.environ else model


def skip_without_sdpa(auto: str, model_dir: Path) -> None:
    """Skip when the stock class behind `model_dir` has no sdpa attention in this release (GPT-J in transformers 5.16)."""
    import transformers

    auto_class = getattr(transformers, auto)
    model_class = auto_class._model_mapping[type(transformers.AutoConfig.from_pretrained(model_dir))]
    if not model_class._supports_sdpa:
        pytest.skip(f"{model_class.__name__} has no sdpa attention in transformers {transformers.__version__}, as "
                    "its stock class has none")


def greedy_generate(model, **kwargs) -> torch.Tensor:
    """Greedy search as GenerationMixin runs it, which `model.generate` is for every family but whisper: whisper's
    own generate adds language and timestamp handling around it and, in transformers 5.24, logs a deprecation
    from inside transformers, which the suite treats as an error."""
    import transformers

    return transformers.GenerationMixin.generate(model, do_sample=False, **on_model(model, kwargs)).cpu()


def logits(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def build_tiny_no_native(family, seed: int = 0):
    """A stock transformers t5, gpt_neox, gpt2 or opt model (MHA), with every norm and bias made to count."""
    import transformers

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family.model_type, **family.config)
    model = getattr(transformers, family.auto).from_config(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="session")
def no_native_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny stock model per family that the toolkit's own GQA modeling code serves."""
    from families import NO_NATIVE_FAMILIES

    root = tmp_path_factory.mktemp("no_native")
    dirs = {}
    for family in NO_NATIVE_FAMILIES:
        build_tiny_no_native(family).save_pretrained(root / family.model_type)
        dirs[family.model_type] = root / family.model_type
    return dirs
