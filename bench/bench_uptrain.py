"""Benchmark: tokens/s of the gqa-uptrain loop against a minimal hand-written PyTorch loop, in one run.

    .venv/bin/python bench/bench_uptrain.py [--steps 20] [--rounds 8]

All train the same tiny converted llama (2 layers, hidden 64, 4 query heads -> 2 KV heads) on the same packed
python-stdlib blocks with the same batch and AdamW. The minimal loop is forward, backward, optimizer step and
nothing else, on batches already in memory. The gqa-uptrain loop is `train(recipe)` logging every step, timed
from its own metrics log (each step's window holds its bookkeeping: lr, loss reduction, NaN check, log line,
progress bar; setup and the final save are left out of both). A last row shows the minimal loop with the model's
own `labels=` loss. Rounds alternate the loops and the figures come from the median step time, so that bursts of
load from other processes on a shared machine hit every loop alike and do not decide the result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.uptrain import train, validate_recipe
from gqa_toolkit.uptrain.data import global_batches, load_blocks
from gqa_toolkit.uptrain.metrics import read_metrics
from gqa_toolkit.uptrain.tasks import CausalLM
from gqa_toolkit.uptrain.tiny import build_tiny_mha


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against the next tokens: (B*(T-1), V) vs (B*(T-1),)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def minimal_loop(model_dir: Path, batches: list[torch.Tensor], lr: float, warmup: int, hf_loss: bool) -> list[float]:
    """Seconds per step of forward + backward + AdamW step over `batches` (the first `warmup` are not timed).

    The loss is next-token cross-entropy in a small function (the same math as gqa-uptrain), or with `hf_loss`
    the model's own `labels=` loss. (Writing the cross-entropy inline in one expression measured about 10% slower
    on CPU here: with a 33 MB logits tensor per step, when temporaries are freed changes the allocator's work.)
    """
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    times = []
    for ids in batches:
        start = time.perf_counter()
        if hf_loss:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = next_token_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def uptrain_loop(recipe: dict, out: Path, warmup: int) -> list[float]:
    """Seconds per step of gqa-uptrain after the first `warmup` steps, from its metrics log (logged every step)."""
    train(validate_recipe({**recipe, "output": {**recipe["output"], "dir": str(out), "log_every": 1}}))
    step_tokens = recipe["data"]["block_size"] * recipe["train"]["batch_size"]
    return [step_tokens / m["tokens_per_s"] for m in read_metrics(out) if "tokens_per_s" in m][warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = 3

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_mha(tmp / "mha")
        model_dir = convert_checkpoint(tmp / "mha", tmp / "gqa", method="mean", groups=2, progress=False)
        recipe = {
            "model": {"path": str(model_dir)},
            "data": {"source": "python-stdlib", "max_documents": 300, "block_size": args.block_size,
                     "eval_blocks": 0, "cache_dir": str(tmp / "cache")},
            "train": {"max_steps": warmup + args.steps, "batch_size": args.batch_size,
                      "micro_batch_size": args.batch_size, "lr": 1e-3, "warmup_fraction": 0.0,
                      "max_grad_norm": None, "precision": "fp32"},
            "output": {"dir": "", "save_every": 10**6, "eval_every": 10**6, "progress": False},
        }
        recipe_clipped = {**recipe, "train": {**recipe["train"], "max_grad_norm": 1.0}}
        blocks = load_blocks(validate_recipe({**recipe, "output": {"dir": "x"}}).data,
                             AutoTokenizer.from_pretrained(model_dir), CausalLM(args.block_size))
        stream = global_batches(blocks.train, args.batch_size, seed=0)
        batches = [next(stream)["input_ids"] for _ in range(warmup + args.steps)]

        times = {"minimal": [], "gqa-uptrain": [], "gqa-uptrain, clipping": [], "minimal, labels= loss": []}
        for r in range(args.rounds):
            times["minimal"] += minimal_loop(model_dir, batches, 1e-3, warmup, hf_loss=False)
            times["gqa-uptrain"] += uptrain_loop(recipe, tmp / f"run{r}", warmup)
            times["gqa-uptrain, clipping"] += uptrain_loop(recipe_clipped, tmp / f"clip{r}", warmup)
            times["minimal, labels= loss"] += minimal_loop(model_dir, batches, 1e-3, warmup, hf_loss=True)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    step_tokens = args.batch_size * args.block_size
    base = step_tokens / statistics.median(times["minimal"])
    print(f"\ntiny llama (2 layers, hidden 64, 4 heads -> 2 KV heads), batch {args.batch_size} x {args.block_size} "
          f"tokens, AdamW, fp32, {torch.get_num_threads()} threads; tokens/s from the median step time of "
          f"{args.rounds} alternating rounds x {args.steps} steps")
    print("| loop | tokens/s | vs minimal |\n|---|---:|---:|")
    for name, values in times.items():
        rate = step_tokens / statistics.median(values)
        print(f"| {name} | {rate:,.0f} | {rate / base:.3f}x |")


if __name__ == "__main__":
    main()
