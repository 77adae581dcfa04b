"""Where and in what precision models are measured: the GPU in bf16 when there is one, else the CPU in fp32."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gqa_toolkit.model_dir import ModelDir

DEVICE_ENV = "GQA_EVAL_DEVICE"  # e.g. cpu, to measure on the CPU of a GPU machine


def eval_device() -> torch.device:
    """GQA_EVAL_DEVICE when set (checked as gqa-convert's --device is), else the GPU when there is one."""
    from gqa_toolkit.errors import ConversionError
    from gqa_toolkit.convert.options import parse_device

    from .errors import EvalError

    name = os.environ.get(DEVICE_ENV) or "auto"
    try:
        return parse_device(name)
    except ConversionError as exc:
        problem = str(exc).split("; ", 1)[0].replace("--device", DEVICE_ENV)  # the option's words, for the variable
        raise EvalError(f"{problem}; set {DEVICE_ENV} to cpu, cuda or cuda:N, or unset it") from None


def eval_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_for_eval(model: ModelDir | str | Path):
    """The model (a checked folder), on the evaluation device, in its precision, in eval mode."""
    from .errors import EvalError

    device = eval_device()
    model = model if isinstance(model, ModelDir) else ModelDir(Path(model), "MODEL_DIR", EvalError)
    return model.model(eval_dtype(device)).to(device).eval()
