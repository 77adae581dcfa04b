"""Shared fixtures for the uptrain tests: a local tokenizer, a tiny MHA llama (the teacher), its GQA conversion,
and a helper that writes recipes for them. Everything is built once per session, on CPU, with no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from gqa_toolkit import corpus
from gqa_toolkit.families.presets import PRESETS
from gqa_toolkit.uptrain.tokenizer import train_tokenizer

TINY = {**PRESETS["tiny-llama"].config, "max_position_embeddings": 256}


def mean_pool_kv(mha: LlamaForCausalLM, groups: int) -> dict[str, torch.Tensor]:
    """K/V projections of `mha` averaged within contiguous groups of heads (query head h -> group h // (H/G))."""
    cfg = mha.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    state = {}
    for name, w in mha.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = w.view(groups, cfg.num_key_value_heads // groups, hd, -1)  # (G, H/G, hd, d)
            w = heads.mean(dim=1).reshape(groups * hd, -1)  # (G*hd, d)
        state[name] = w
    return state


@pytest.fixture(scope="session")
def uptrain_models(tmp_path_factory) -> dict[str, Path]:
    """{'mha': teacher dir, 'gqa': converted dir (2 KV heads, gqa_conversion recorded), 'cache': block cache}."""
    root = tmp_path_factory.mktemp("uptrain_models")
    tokenizer = train_tokenizer((r["text"] for r in corpus.iter_texts("train", limit=150)), vocab_size=512)
    torch.manual_seed(0)
    mha = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    mha.save_pretrained(root / "mha")
    tokenizer.save_pretrained(root / "mha")

    gqa = LlamaForCausalLM(LlamaConfig(**{**mha.config.to_dict(), "num_key_value_heads": 2}))
    gqa.load_state_dict(mean_pool_kv(mha, groups=2))
    gqa.save_pretrained(root / "gqa")
    tokenizer.save_pretrained(root / "gqa")
    config_path = root / "gqa" / "config.json"
    config = json.loads(config_path.read_text())
    config["gqa_conversion"] = {"method": "mean", "groups": 2, "source": str(root / "mha"), "source_kv_heads": 4,
                                "seed": 0, "toolkit_version": "test"}
    config_path.write_text(json.dumps(config, indent=2))
    (root / "gqa" / "README.md").write_text("# tiny-gqa\n\nConverted with method `mean`, G=2.\n")
    return {"mha": root / "mha", "gqa": root / "gqa", "cache": root / "cache"}


def recipe_writer(defaults: dict, folder: Path, default_name: str):
    """write(name, **sections) -> path of a recipe YAML: `sections` merged over `defaults`, key by key."""

    def write(name: str = default_name, **sections) -> Path:
        recipe = {section: dict(values) for section, values in defaults.items()}
        for section, values in sections.items():
            recipe.setdefault(section, {}).update(values)
        path = folder / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture
def write_recipe(uptrain_models, tmp_path):
    """write_recipe(**sections) -> path of a recipe for the tiny GQA model, with sections merged over defaults."""
    return recipe_writer({
        "model": {"path": str(uptrain_models["gqa"])},
        "data": {"source": "python-stdlib", "max_documents": 40, "block_size": 64, "eval_blocks": 8,
                 "cache_dir": str(uptrain_models["cache"])},
        "train": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_fraction": 0.0},
        "output": {"dir": str(tmp_path / "run"), "save_every": 2, "log_every": 1, "eval_every": 100,
                   "progress": False},
    }, tmp_path, "recipe.yaml")


TINY_T5 = PRESETS["tiny-t5"].config


@pytest.fixture(scope="session")
def t5_models(tmp_path_factory) -> dict[str, Path]:
    """{'mha': a tiny stock T5 with a sentinel-bearing tokenizer, 'mqa': its gqa-convert output (G=1, decoder and
    cross-attention, the paper's setup), 'cache': block cache}."""
    from transformers import T5Config, T5ForConditionalGeneration

    from gqa_toolkit.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("t5_models")
    tokenizer = train_tokenizer((r["text"] for r in corpus.iter_texts("train", limit=150)), vocab_size=512,
                                sentinels=100)
    torch.manual_seed(0)
    config = T5Config(**TINY_T5, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(root / "mha")
    tokenizer.save_pretrained(root / "mha")
    convert_checkpoint(root / "mha", root / "mqa", method="mean", groups=1, progress=False)
    return {"mha": root / "mha", "mqa": root / "mqa", "cache": root / "cache"}


@pytest.fixture
def write_t5_recipe(t5_models, tmp_path):
    """write_t5_recipe(**sections) -> path of a span-corruption recipe for the tiny T5 converted to MQA."""
    return recipe_writer({
        "model": {"path": str(t5_models["mqa"])},
        "data": {"source": "python-stdlib", "max_documents": 40, "block_size": 48, "eval_blocks": 8,
                 "cache_dir": str(t5_models["cache"])},
        "train": {"max_steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_fraction": 0.0,
                  "optimizer": "adafactor"},
        "output": {"dir": str(tmp_path / "t5run"), "save_every": 3, "log_every": 1, "eval_every": 3,
                   "progress": False, "trackers": []},
    }, tmp_path, "t5.yaml")
