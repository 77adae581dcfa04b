"""What the output directory records about how it was made: config.json, a model card, the source's other files."""

from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import gqa_toolkit

from .families.spec import ArchitectureSpec
from .io.disk import write_files
from .io.reader import stays_inside_source
from .io.records import CONVERSION_KEY

log = logging.getLogger("gqa_toolkit.convert")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
NOT_COPIED = {"config.json", "README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def conversion_record(*, method: str, groups: int, source: str, geometries: dict[str, Any], scope: str, seed: int,
                      dtype: torch.dtype | None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`geometries`: attention kind -> Geometry of the kinds converted; `scope` the --attention choice."""
    geometry = next(iter(geometries.values()))
    return {
        "method": method,
        "groups": groups,
        "source": source,
        "source_kv_heads": geometry.kv_heads,
        "num_attention_heads": geometry.heads,
        "attention": scope,
        "attention_kinds": list(geometries),
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "toolkit_version": gqa_toolkit.__version__,
        **(options or {}),  # grouping, norm preservation and calibration, when not the defaults
    }


def converted_config(raw: dict[str, Any], spec: ArchitectureSpec, record: dict[str, Any]) -> dict[str, Any]:
    config = dict(raw)
    for kind in record["attention_kinds"]:
        if (attr := spec.kv_heads_attr_of(kind)) is not None:
            config[attr] = record["groups"]
    config.update(spec.set_config)
    if spec.modeling is not None:  # the toolkit's GQA modeling code, shipped in the output directory
        config.update(model_type=spec.modeling.model_type, architectures=list(spec.modeling.architectures),
                      auto_map=dict(spec.modeling.auto_map))
    if record["dtype"] is not None:
        config["dtype"] = record["dtype"]
        config.pop("torch_dtype", None)
    config[CONVERSION_KEY] = record
    return config


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy the source's tokenizer, generation config and other small files; a link that leads outside the source
    is skipped with a warning, so nothing from elsewhere on the machine ends up in an output people upload."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.name in NOT_COPIED:
            continue
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name == "training_args.bin":
            continue
        if not stays_inside_source(path, src):
            log.warning(f"skipped {path.name}: a link to {path.resolve()}, outside the source directory")
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def foreign_code(copied: list[str], raw_config: dict[str, Any], spec: ArchitectureSpec) -> list[str]:
    """What of the source's own code the output carries: its .py files and its config's auto_map entries (the
    toolkit's modeling files replace both for its own families)."""
    own = set(spec.modeling.files) if spec.modeling is not None else set()
    code = [name for name in copied if name.endswith(".py") and name not in own]
    if spec.modeling is None:
        code += [f"auto_map {k} -> {v}" for k, v in (raw_config.get("auto_map") or {}).items()]
    return code


def _modeling_note(spec: ArchitectureSpec) -> str:
    if spec.modeling is None:
        return ""
    auto = next(k for k in spec.modeling.auto_map if k != "AutoConfig")
    return f"""
transformers has no grouped-query attention for this family, so the modeling code is in this directory
(`{spec.modeling.file}`); load it with `{auto}.from_pretrained(path, trust_remote_code=True)`, or without
`trust_remote_code` in a process that has imported `gqa_toolkit.convert`.
"""


def _foreign_code_note(code: list[str]) -> str:
    if not code:
        return ""
    return f"""
The source carried code of its own, copied here unchanged and not written by gqa-toolkit: {', '.join(code)}. It
runs only under `trust_remote_code=True`; read it before you do.
"""


def model_card(record: dict[str, Any], model_type: str, spec: ArchitectureSpec | None = None,
               code: list[str] = ()) -> str:
    H, G0, G = record["num_attention_heads"], record["source_kv_heads"], record["groups"]
    kinds = record.get("attention_kinds", ["self"])
    attention_row = f"| attention converted | {', '.join(kinds)} (`--attention {record['attention']}`) |\n" \
        if spec is not None and len(spec.attention) > 1 else ""
    return f"""---
tags:
- gqa
- gqa-toolkit
---
# {model_type} with grouped-query attention ({G} KV heads)

Converted from `{record['source']}` by gqa-toolkit {record['toolkit_version']}:

| | |
|---|---|
| method | `{record['method']}` |
| query heads | {H} |
| KV heads | {G0} -> {G} (each shared by {H // G} query heads) |
| KV cache per token | {G / G0:.3g}x the source's |
{attention_row}| seed | {record['seed']} |
| dtype | {record['dtype'] or 'as the source'} |

Query head `h` uses KV head `h // {H // G}`. The `{record['method']}` method initialised each group's key/value
projections from the source's heads in that group; the model has not been uptrained since, so expect a quality
drop until it is (`gqa-uptrain`). The full record is under `{CONVERSION_KEY}` in config.json.
{_modeling_note(spec) if spec is not None else ""}{_foreign_code_note(list(code))}"""


def write_metadata(src: Path, dst: Path, raw_config: dict[str, Any], spec: ArchitectureSpec,
                   record: dict[str, Any]) -> None:
    code = foreign_code(copy_non_weight_files(src, dst), raw_config, spec)
    if code:
        log.warning(f"the output carries the source's own code: {', '.join(code)} (named in its README.md; it "
                    f"runs only under trust_remote_code)")
    config = converted_config(raw_config, spec, record)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "README.md").write_text(model_card(record, raw_config["model_type"], spec, code))
    if spec.modeling is not None:
        write_modeling(dst, spec)


def write_modeling(dst: Path, spec: ArchitectureSpec) -> list[Path]:
    """Write the family's modeling files into `dst`, all replaced atomically (a reader sees the old files or the
    new ones, never half of one); returns their paths."""
    files = {dst / name: (resources.files("gqa_toolkit.convert.families.modeling") / name).read_text()
             for name in spec.modeling.files}
    write_files(files)
    return list(files)
