"""At real model sizes: conversion time, KV-cache size, prefill and decode speed, and uptraining throughput, for an
MHA model and its GQA conversions side by side. Meant for a GPU; runs (slowly) anywhere.

    python bench/bench_scale.py --shape t5-large --groups 8,1 --contexts 512,2048 --batch-sizes 1,32
    python bench/bench_scale.py --shape llama-1b --groups 4,1 --contexts 2048,8192 --batch-sizes 1,16
    python bench/bench_scale.py --shape whisper-base --groups 2,1 --batch-sizes 16
    python bench/bench_scale.py --shape tiny-ablation --groups 2,1 --contexts 128,896 --batch-sizes 1,8 \
        --decode-steps 16 --decode dynamic,static,static+compile

Each point is decoded in each loop of --decode (gqa-eval speed's: the eager loop with a growing cache, a
preallocated static cache, and the static cache with a torch.compile'd step), so the loops' figures come from one
run, each with its ratio to MHA in the same loop. `tiny-ablation` is the llama that recipes/tiny-ablation.yaml
pretrains (random weights here), to measure its speed cells in every loop.

A random MHA checkpoint of the named shape is written in bf16 (no download: weights are random, the tokenizer is
a byte-level BPE learnt from the python-stdlib corpus, so the vocabulary is smaller than the real model's). Each G
is converted with `convert_checkpoint` (mean), then every model is measured with gqa-eval's speed functions (bf16
on the GPU, fastest of --repeats rounds) and, with --uptrain-steps, uptrained for that many steps with the
gqa-uptrain loop (bf16 mixed precision; Adafactor and span corruption for T5, AdamW and next-token for llama).
Prints markdown tables with ratios to the MHA model. Random weights are fine here: speed does not depend on them.
A whisper shape encodes its whole 30 s window (1,500 positions, from random log-mel features; --contexts does not
apply), then decodes with its self- and cross-attention caches; it has no tokenizer and is not uptrained.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"t5-large": "t5-v1.1-large", "t5-base": "t5-v1.1-base", "t5-small": "t5-v1.1-small",
          "llama-1b": "llama-1b-mha", "whisper-base": "whisper-base",
          "whisper-large": "whisper-large-v3"}  # name here -> preset (gqa_toolkit.families.presets)
TINY_ABLATION = "tiny-ablation"  # the original that recipes/tiny-ablation.yaml builds


def audio_window(shape: str) -> int | None:
    """The encoder positions of an audio shape's whole window (whisper: 1,500); None for a text shape."""
    from gqa_toolkit.families.presets import PRESETS
    from gqa_toolkit.families.spec import audio_input

    if shape == TINY_ABLATION:
        return None
    preset = PRESETS[SHAPES[shape]]
    audio = audio_input(preset.model_type)
    return getattr(preset.transformers_config(), audio.positions_attr) if audio else None


def write_source(shape: str, out: Path, vocab: int) -> Path:
    from gqa_toolkit import corpus
    from gqa_toolkit.families.presets import PRESETS
    from gqa_toolkit.uptrain.tokenizer import train_tokenizer

    if shape == TINY_ABLATION:  # random weights of the recipe's shape, in fp32 as the ablation measures it
        from transformers import LlamaForCausalLM

        from gqa_toolkit.eval.ablation_recipe import load_ablation_recipe
        from gqa_toolkit.eval.original import original_config

        torch.manual_seed(0)
        build = load_ablation_recipe("tiny-ablation.yaml").original.build
        LlamaForCausalLM(original_config(build)).save_pretrained(out)
        return out
    preset = PRESETS[SHAPES[shape]]
    if audio_window(shape):  # random weights at the real vocabulary; speed needs no tokenizer
        torch.manual_seed(0)
        preset.model().to(torch.bfloat16).save_pretrained(out)
        return out
    tokenizer = train_tokenizer((r["text"] for r in corpus.iter_texts("train", limit=400)), vocab_size=vocab,
                                sentinels=100 if shape.startswith("t5") else 0)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if shape.startswith("t5"):
        ids["decoder_start_token_id"] = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = preset.model(vocab_size=len(tokenizer), **ids).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def uptrain_throughput(model_dir: Path, out: Path, steps: int, block: int, batch: int, micro: int) -> dict:
    from gqa_toolkit.uptrain import train, validate_recipe
    from gqa_toolkit.uptrain.metrics import read_metrics

    t5 = json.loads((model_dir / "config.json").read_text()).get("is_encoder_decoder", False)
    recipe = validate_recipe({
        "model": {"path": str(model_dir)},
        "data": {"source": "python-stdlib", "block_size": block, "eval_blocks": 0, "max_documents": 4000},
        "train": {"max_steps": steps, "batch_size": batch, "micro_batch_size": micro, "lr": 1e-4,
                  "warmup_fraction": 0.0, "precision": "bf16", "optimizer": "adafactor" if t5 else "adamw"},
        "output": {"dir": str(out), "save_every": 10**6, "eval_every": 10**6, "log_every": 1, "progress": False,
                   "trackers": []},
    })
    train(recipe)
    rates = [m["tokens_per_s"] for m in read_metrics(out) if "tokens_per_s" in m][2:]  # first steps warm up
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"tokens_per_s": sorted(rates)[len(rates) // 2], "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted([*SHAPES, TINY_ABLATION]), default="t5-large")
    parser.add_argument("--groups", default="8,1")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", default="dynamic,static", help="decode loops, comma-separated: dynamic, static, "
                                                                  "static+compile")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--uptrain-steps", type=int, default=0)
    parser.add_argument("--uptrain-block", type=int, default=512)
    parser.add_argument("--uptrain-batch", type=int, default=32)
    parser.add_argument("--uptrain-micro", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    from gqa_toolkit.convert import convert_checkpoint
    from gqa_toolkit.eval.placement import eval_device, eval_dtype, load_for_eval
    from gqa_toolkit.eval.speed import kv_cache_bytes_per_token, measure_speed

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    dtype = str(eval_dtype(eval_device())).removeprefix("torch.")
    groups = [int(g) for g in args.groups.split(",")]
    loops = args.decode.split(",")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        models = {"MHA": write_source(args.shape, tmp / "mha", args.vocab)}
        print(f"wrote a random {args.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
        converted = {}
        for g in groups:
            t0 = time.perf_counter()
            models[f"G={g}"] = convert_checkpoint(tmp / "mha", tmp / f"g{g}", method="mean", groups=g,
                                                  progress=False)
            converted[f"G={g}"] = time.perf_counter() - t0
        print("conversion seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in converted.items()), flush=True)

        results = {"shape": args.shape, "device": device, "dtype": dtype, "convert_s": converted, "speed": [],
                   "uptrain": {}}
        for name, path in models.items():
            model = load_for_eval(path)
            params = sum(p.numel() for p in model.parameters())
            kv = kv_cache_bytes_per_token(model)
            for c in [audio_window(args.shape)] if audio_window(args.shape) else map(int, args.contexts.split(",")):
                for b in map(int, args.batch_sizes.split(",")):
                    for loop in loops:
                        t0 = time.perf_counter()
                        point = measure_speed(model, c, b, args.decode_steps, args.repeats, loop)
                        results["speed"].append({"model": name, "params": params, "kv_bytes_per_token": kv,
                                                 **point.__dict__})
                        print(f"{name} ctx {c} batch {b} {loop}: decode {point.decode_tokens_per_s:,.0f} tok/s "
                              f"({time.perf_counter() - t0:.0f} s with warm-up)", flush=True)
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            if args.uptrain_steps and not audio_window(args.shape):
                torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
                results["uptrain"][name] = uptrain_throughput(path, tmp / f"up-{name}", args.uptrain_steps,
                                                              args.uptrain_block, args.uptrain_batch,
                                                              args.uptrain_micro)
                print(f"{name} uptrain: {results['uptrain'][name]}", flush=True)

    vocab = "its own vocab" if audio_window(args.shape) or args.shape == TINY_ABLATION else f"vocab {args.vocab}"
    first = results["speed"][0]
    print(f"\n{args.shape} (random weights, {vocab}), {dtype} on {device} ({first['device']}), attention kernel "
          f"{first['attention']}; fastest of {args.repeats} rounds, {args.decode_steps} decode steps, decode tok/s "
          f"(x vs MHA in the same loop)")
    print("| model | params | KV bytes/token | context | batch | prefill tok/s | " +
          " | ".join(f"decode, {loop}" for loop in loops) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(loops))
    speed = {(r["model"], r["context"], r["batch_size"], r["decode"]): r for r in results["speed"]}
    for (name, c, b, loop), r in speed.items():
        if loop != loops[0]:
            continue
        cells = []
        for each in loops:
            point, mha = speed[(name, c, b, each)], speed[("MHA", c, b, each)]
            ratio = point["decode_tokens_per_s"] / mha["decode_tokens_per_s"]
            cells.append(f"{point['decode_tokens_per_s']:,.0f} ({ratio:.2f}x)")
        print(f"| {name} | {r['params'] / 1e6:,.1f}M | {r['kv_bytes_per_token']:,.0f} | {c} | {b} | "
              f"{r['prefill_tokens_per_s']:,.0f} | " + " | ".join(cells) + " |")
    if results["uptrain"]:
        print(f"\nuptraining, {args.uptrain_batch} x {args.uptrain_block} tokens per step, median tokens/s")
        print("| model | tokens/s | vs MHA | peak GPU memory (GiB) |\n|---|---:|---:|---:|")
        mha = results["uptrain"]["MHA"]["tokens_per_s"]
        for name, r in results["uptrain"].items():
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / mha:.2f}x | {r['peak_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
