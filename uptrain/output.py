"""The finished model: a Hugging Face directory in safetensors, with the conversion record kept, an uptraining
record added to config.json, the resolved recipe beside it, and a section appended to the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

import gqa_toolkit
from gqa_toolkit.dtypes import DTYPES
from gqa_toolkit.model_dir import ModelDir
from gqa_toolkit.records import CONVERSION_KEY, UPTRAINING_KEY
from gqa_toolkit.convert.provenance import UPTRAINING_SECTION, with_section

from .recipe import Recipe
from .run_dir import MODEL_TMP, RECIPE_FILE
from .speech import PROCESSOR_FILES
from .storage import disk_writes
from .trainable import resolve_trainable

_MODEL_FILES = ("*.safetensors", "model.safetensors.index.json")


def uptraining_record(recipe: Recipe, state: dict, task: str, config) -> dict:
    t = recipe.train
    return {
        "steps": state["step"],
        "tokens": state["tokens"],
        "fraction": t.fraction if t.original_steps is not None else None,
        "original_steps": t.original_steps,
        "final_loss": state.get("loss"),
        "heldout_loss": state.get("heldout_loss"),
        "objective": task if recipe.objective.distill_weight == 0 else f"{task}+distill",
        "distill_weight": recipe.objective.distill_weight,
        "trainable": resolve_trainable(config, recipe.model.trainable),
        "data": recipe.data.source,
        "block_size": recipe.data.block_size,
        "batch_size": t.batch_size,
        "recipe": RECIPE_FILE,
        "toolkit_version": gqa_toolkit.__version__,
    }


def uptraining_section(record: dict) -> str:
    """The model card's Uptraining section (its body), which replaces the converter's "not uptrained"."""
    budget = (f"{record['fraction']:g} x {record['original_steps']} original steps = " if record["fraction"] else "")
    loss = "n/a" if record["final_loss"] is None else f"{record['final_loss']:.4f}"
    held = "n/a" if record["heldout_loss"] is None else f"{record['heldout_loss']:.4f}"
    return (
        f"Uptrained with gqa-toolkit {record['toolkit_version']} for {budget}{record['steps']} steps "
        f"({record['tokens']:,} tokens) on `{record['data']}`, objective `{record['objective']}`, "
        f"training `{record['trainable']}` parameters.\n\n"
        f"| final train loss | held-out loss |\n|---|---|\n| {loss} | {held} |\n\n"
        f"The resolved recipe is in `{RECIPE_FILE}`; `config.json` holds this record under `{UPTRAINING_KEY}`.\n"
    )


def save_output(accelerator, model, tokenizer, recipe: Recipe, state: dict, student: ModelDir, task: str) -> Path:
    """Write the uptrained model into output.dir (files are written to a temporary folder, then moved in)."""
    out = Path(recipe.output.dir)
    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers shards)
    if accelerator.is_main_process:
        source = student.settings
        dtype = DTYPES.get(source.get("dtype") or source.get("torch_dtype") or "float32", torch.float32)
        unwrapped = accelerator.unwrap_model(model)
        record = uptraining_record(recipe, state, task, unwrapped.config)
        config = unwrapped.config
        config.dtype = dtype
        if CONVERSION_KEY in source:
            setattr(config, CONVERSION_KEY, source[CONVERSION_KEY])
        setattr(config, UPTRAINING_KEY, record)
        tmp = out / MODEL_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        with disk_writes(out, "the uptrained model into", "output.dir",
                         cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
            unwrapped.save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in state_dict.items()})
            tokenizer.save_pretrained(tmp)
            for name in PROCESSOR_FILES:  # a speech model's feature extractor
                if (student.path / name).is_file():
                    shutil.copy2(student.path / name, tmp / name)
            card = student.path / "README.md"
            text = with_section(card.read_text() if card.is_file() else "", UPTRAINING_SECTION,
                                uptraining_section(record))
            (tmp / "README.md").write_text(text)
            _move_into(tmp, out)
    accelerator.wait_for_everyone()
    return out


def _move_into(tmp: Path, out: Path) -> None:
    """Rename the saved files into `out` (same disk: no space needed), replacing an earlier save's."""
    for pattern in _MODEL_FILES:  # a previous save may have used a different number of shards
        for old in out.glob(pattern):
            old.unlink()
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
