"""Where and in what precision models are measured: the GPU in bf16 when there is one, else the CPU in fp32."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gqa_toolkit.uptrain.model import load_model

DEVICE_ENV = "GQA_EVAL_DEVICE"  # e.g. cpu, to measure on the CPU of a GPU machine


def eval_device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu"))


def eval_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_for_eval(path: str | Path):
    """The model in `path`, on the evaluation device, in its precision, in eval mode."""
    device = eval_device()
    return load_model(Path(path), eval_dtype(device)).to(device).eval()
