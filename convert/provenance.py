"""What the output directory records about how it was made: config.json, a model card, the source's other files."""

from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK  # the hub's own test for front matter

import gqa_toolkit

from gqa_toolkit.families.spec import ArchitectureSpec, lm_auto_class_name
from gqa_toolkit.disk import write_files
from .io.reader import stays_inside_source
from gqa_toolkit.records import CONVERSION_KEY
from .methods.registry import layer_methods, method_summary

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
    if "native" in record:  # a stock family holds the output: its own model_type, no toolkit code
        native = spec.native
        config.update(model_type=native.model_type, architectures=list(native.architectures), **native.set_config,
                      **record["native_config"])
        for attr in {spec.kv_heads_attr_of(kind) for kind in record["attention_kinds"]} - {None}:
            config.pop(attr, None)
        config.pop("auto_map", None)
        return _with_record(config, record)
    for kind in record["attention_kinds"]:
        if (attr := spec.kv_heads_attr_of(kind)) is not None:
            config[attr] = groups_of(record, kind)
    config.update(spec.set_config)
    if spec.modeling is not None:  # the toolkit's GQA modeling code, shipped in the output directory
        config.update(model_type=spec.modeling.model_type, architectures=list(spec.modeling.architectures),
                      auto_map=dict(spec.modeling.auto_map))
    return _with_record(config, record)


def groups_of(record: dict[str, Any], kind: str) -> int:
    """The G a conversion record gives one attention kind (its own under --kind-groups, else --groups)."""
    return record.get("kind_groups", {}).get(kind, record["groups"])


def _with_record(config: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
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


def _loading_note(record: dict[str, Any], spec: ArchitectureSpec | None) -> str:
    if "native" in record:
        return (f"\nWritten as stock transformers `{record['native']}` (multi-query), which holds this conversion "
                f"exactly: it loads with `AutoModelForCausalLM.from_pretrained(path)`, with no remote code.\n")
    return _modeling_note(spec) if spec is not None else ""


def _modeling_note(spec: ArchitectureSpec) -> str:
    if spec.modeling is None:
        return ""
    auto = spec.modeling.auto_class
    return f"""
transformers has no grouped-query attention for this family, so the modeling code is in this directory
(`{spec.modeling.file}`); load it with `{auto}.from_pretrained(path, trust_remote_code=True)`, or without
`trust_remote_code` in a process that has imported `gqa_toolkit.families.modeling`.
"""


def _foreign_code_note(code: list[str]) -> str:
    if not code:
        return ""
    return f"""
The source carried code of its own, copied here unchanged and not written by gqa-toolkit: {', '.join(code)}. It
runs only under `trust_remote_code=True`; read it before you do.
"""


UPTRAINING_SECTION = "## Uptraining"
NOT_UPTRAINED = "Not uptrained since the conversion: expect a quality drop until it is (`gqa-uptrain`).\n"
# an audio model: gqa-uptrain takes (audio, transcript) pairs
NOT_UPTRAINED_AUDIO = ("Not uptrained since the conversion: expect a quality drop until it is, with gqa-uptrain "
                       "on (audio, transcript) pairs (recipes/whisper-uptrain.yaml).\n")


def _method_description(record: dict[str, Any]) -> str:
    """What the conversion changed, true for the method and options the record names."""
    H, G = record["num_attention_heads"], record["groups"]
    method = record["method"]
    if method in layer_methods():
        what = (f"`{method}` ({method_summary(method)}) converted each layer's attention as a whole: the shared K/V "
                f"heads, and the queries and outputs that compensate for them, so Q and O change too")
    else:
        what = (f"`{method}` ({method_summary(method).lower()}) made each group's K/V projections from the source's "
                f"heads in the group")
    grouping = record.get("grouping", "contiguous")
    if grouping == "similarity":
        what += ("; the KV heads were grouped by similarity, and the query rows and output columns permuted to "
                 "match, so the function of every head is unchanged")
    if record.get("preserve_norm"):
        what += "; each pooled head was scaled to its group's mean head norm"
    if errors := record.get("refinement_error_mean"):
        precision = " (bf16 autocast)" if record.get("refine_precision") == "bf16" else ""
        what += (f"; then each attention unit's K/V, Q and O were refined for {record['refine_steps']} steps"
                 f"{precision} against the source's attention output on the calibration activations (relative "
                 f"error {errors[0]:.3g} -> {errors[1]:.3g}, the mean over units)")
    if "kind_groups" in record:
        shares = ", ".join(f"`h // {H // g}` in the {kind} attention" for kind, g in record["kind_groups"].items())
        return f"{what}. Query head `h` uses KV head {shares}."
    return f"{what}. Query head `h` uses KV head `h // {H // G}`."


def _calibration(record: dict[str, Any]) -> str:
    if not record.get("calibration_tokens"):
        return "none (weights only)"
    return (f"`{record['calibration']}`, {record['calibration_sequences']} sequences, "
            f"{record['calibration_tokens']:,} tokens ({record.get('calibration_mode', 'source')} activations)")


# the hub's pipeline tag for a model loaded through each Auto class, when the source's card names none
PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForSeq2SeqLM": "text2text-generation",
                 "AutoModelForSpeechSeq2Seq": "automatic-speech-recognition"}


def card_data(record: dict[str, Any], auto_class: str, source_card: ModelCardData | None) -> ModelCardData:
    """Front matter: the source as base_model, transformers as the library, the source card's license,
    pipeline_tag, datasets and language carried over."""
    carried = {key: getattr(source_card, key, None) for key in ("license", "pipeline_tag", "datasets", "language")}
    carried["pipeline_tag"] = carried["pipeline_tag"] or PIPELINE_TAGS[auto_class]
    tags = ["gqa", "gqa-toolkit", *(getattr(source_card, "tags", None) or [])]
    return ModelCardData(base_model=record.get("source_repo") or record["source"], library_name="transformers",
                         tags=list(dict.fromkeys(tags)), **{k: v for k, v in carried.items() if v})


def model_card(record: dict[str, Any], model_type: str, spec: ArchitectureSpec | None = None,
               code: list[str] = (), source_card: ModelCardData | None = None,
               auto_class: str = "AutoModelForCausalLM") -> ModelCard:
    H, G0, G = record["num_attention_heads"], record["source_kv_heads"], record["groups"]
    kinds = record.get("attention_kinds", ["self"])
    attention_row = f"| attention converted | {', '.join(kinds)} (`--attention {record['attention']}`) |\n" \
        if spec is not None and len(spec.attention) > 1 else ""
    before, after = record.get("kv_cache_bytes_per_token_source"), record.get("kv_cache_bytes_per_token")
    kv_bytes = f"{before:,} -> {after:,} bytes ({after / before:.3g}x)" if before else f"{G / G0:.3g}x the source's"
    kv_heads = f"{G0} -> {G} (each shared by {H // G} query heads)"
    title = f"{G} KV heads"
    if "kind_groups" in record:  # each kind its own G
        title = ", ".join(f"{kind} {g}" for kind, g in record["kind_groups"].items()) + " KV heads"
        kv_heads = ", ".join(f"{kind} {G0} -> {g}" for kind, g in record["kind_groups"].items())
        attention_row += _kind_rows(record["kinds"])
    body = f"""# {model_type} with grouped-query attention ({title})

Converted from `{record.get('source_repo') or record['source']}` by gqa-toolkit {record['toolkit_version']}.

## Conversion

| | |
|---|---|
| method | `{record['method']}` |
| grouping | {record.get('grouping', 'contiguous')} |
| norm preservation | {'yes' if record.get('preserve_norm') else 'no'} |
| calibration | {_calibration(record)} |
| query heads | {H} |
| KV heads | {kv_heads} |
| KV cache per token | {kv_bytes} |
{attention_row}| seed | {record['seed']} |
| dtype | {record['dtype'] or 'as the source'} |

{_method_description(record)} The full record is under `{CONVERSION_KEY}` in config.json.

{UPTRAINING_SECTION}

{NOT_UPTRAINED_AUDIO if spec is not None and spec.audio else NOT_UPTRAINED}{_loading_note(record, spec)}{_foreign_code_note(list(code))}"""
    return ModelCard(f"---\n{card_data(record, auto_class, source_card).to_yaml()}\n---\n{body}")


def _kind_rows(kinds: dict[str, dict[str, int]]) -> str:
    """A table row per converted kind with a KV cache: its bytes per token before and after."""
    rows = ""
    for kind, f in kinds.items():
        if "kv_cache_bytes_per_token_before" in f:
            before, after = f["kv_cache_bytes_per_token_before"], f["kv_cache_bytes_per_token_after"]
            rows += f"| KV cache per token, {kind} | {before:,} -> {after:,} bytes ({after / before:.3g}x) |\n"
    return rows


def with_section(text: str, title: str, body: str) -> str:
    """`text` with the markdown section `title` holding `body` (replacing what it held, or appended)."""
    start = text.find(f"\n{title}\n")
    if start < 0:
        return text.rstrip("\n") + f"\n\n{title}\n\n{body}"
    end = text.find("\n## ", start + len(title) + 2)
    return text[:start] + f"\n{title}\n\n{body}" + (text[end:] if end >= 0 else "")


def _source_card(src: Path) -> ModelCardData | None:
    path = src / "README.md"
    if not path.is_file() or not REGEX_YAML_BLOCK.search(path.read_text(errors="replace")):
        return None  # no front matter (an uptrained model's card from a source without one): nothing to carry
    try:
        return ModelCard.load(path).data
    except (ValueError, OSError, yaml.YAMLError):  # front matter that is not valid YAML: carry nothing from it
        return None


def write_metadata(src: Path, dst: Path, raw_config: dict[str, Any], spec: ArchitectureSpec,
                   record: dict[str, Any]) -> None:
    code = foreign_code(copy_non_weight_files(src, dst), raw_config, spec)
    if code:
        log.warning(f"the output carries the source's own code: {', '.join(code)} (named in its README.md; it "
                    f"runs only under trust_remote_code)")
    config = converted_config(raw_config, spec, record)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model_card(record, raw_config["model_type"], spec, code, _source_card(src),
               lm_auto_class_name(raw_config["model_type"], bool(raw_config.get("is_encoder_decoder")))
               ).save(dst / "README.md")
    if spec.modeling is not None and "native" not in record:
        write_modeling(dst, spec)


def write_modeling(dst: Path, spec: ArchitectureSpec) -> list[Path]:
    """Write the family's modeling files into `dst`, all replaced atomically (a reader sees the old files or the
    new ones, never half of one); returns their paths."""
    files = {dst / name: (resources.files("gqa_toolkit.families.modeling") / name).read_text()
             for name in spec.modeling.files}
    write_files(files)
    return list(files)
