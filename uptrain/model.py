"""What the loop trains and learns from: the converted student and the source teacher, each a kernel `ModelDir`
(its config read once, one preflight)."""

from __future__ import annotations

from pathlib import Path

import torch

from gqa_toolkit.model_dir import ModelDir

from .errors import UptrainError

CONVERTED = "a converted checkpoint (the output of gqa-convert)"
TEACHER = "the MHA source checkpoint that model.path was converted from"


def open_student(path: str | Path) -> ModelDir:
    return ModelDir.open(path, "model.path", CONVERTED, UptrainError)


def teacher_dir(student: ModelDir, override: str | None) -> ModelDir:
    """The distillation teacher: the recipe's objective.teacher, else the source recorded by gqa-convert."""
    return student.source(override, "objective.teacher", f"set objective.teacher to {TEACHER}")


def load_teacher(teacher: ModelDir, student_config, dtype: torch.dtype):
    model = teacher.model(dtype).eval().requires_grad_(False)
    if model.config.vocab_size != student_config.vocab_size:
        raise UptrainError(f"teacher {teacher.path} has vocab_size {model.config.vocab_size} but the student has "
                           f"{student_config.vocab_size}; distill from the checkpoint the student was converted from")
    return model
