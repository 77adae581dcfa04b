"""Conversion methods side by side: fidelity at fraction 0 and held-out loss after short uptraining.

    .venv/bin/python bench/bench_methods.py [--results runs/bench-methods] [--full-original]
    .venv/bin/python bench/bench_methods.py --results runs/bench-methods-lr1e-4 --uptrain-lr 1e-4 \
        --original runs/bench-methods/original --methods mean,aligned,fit

Builds an original with the tiny ablation's code path (recipes/tiny-ablation.yaml through build_original), made
smaller and faster so the whole comparison fits a shared 2-core CPU: hidden 128 (8 heads of 16), 4 layers, 200
pretraining steps of 8 x 128 tokens, uptraining batches of 8 and 32 held-out blocks. --full-original keeps the
recipe's own original (3.7M parameters, 1200 steps of 16 x 128) and batches. Then it runs the ablation runner over
mean, first, random and the new methods at G = H/4 and G = 1 (MQA), fractions 0, 0.01 and 0.05, and prints one
table plus the two targets of docs/methods.md. Finished cells are stored, so a rerun only prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from gqa_toolkit.eval.ablation import Ablation
from gqa_toolkit.eval.ablation_recipe import AblationRecipe

METHODS = ("mean", "first", "random", "mean+norm", "aligned", "fit", "fit+similarity")
SMALL = {"hidden_size": 128, "intermediate_size": 344, "steps": 200, "batch_size": 8, "micro_batch_size": 8}
SMALL_RUN = {"uptrain": {"batch_size": 8, "micro_batch_size": 8}, "data": {"eval_blocks": 32}}
NEW = [m for m in METHODS if m.split("+")[0] in ("aligned", "fit") or "+" in m]
FRACTIONS = (0.0, 0.01, 0.05)


def recipe(results: Path, full_original: bool, methods=METHODS, lr: float | None = None,
           original: str | None = None, fractions=FRACTIONS) -> AblationRecipe:
    raw = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("recipes/tiny-ablation.yaml").read_text())
    raw.update(results_dir=str(results), methods=list(methods), groups=[raw["original"]["build"]["num_heads"] // 4, 1],
               fractions=list(fractions),
               speed={"contexts": [32], "batch_sizes": [1], "decode_steps": 4, "repeats": 1})
    if not full_original:
        raw["original"]["build"].update(SMALL)
        for section, values in SMALL_RUN.items():
            raw[section] = {**raw[section], **values}
    if lr is not None:
        raw["uptrain"]["lr"] = lr
    if original is not None:  # reuse an original built by an earlier run
        steps = json.loads((Path(original).parent / "cells" / "original.json").read_text())["original_steps"]
        raw["original"] = {"path": str(Path(original).resolve()), "original_steps": steps}
    return AblationRecipe.model_validate(raw)


def table(cells: Path, groups: list[int]) -> tuple[str, dict]:
    rows = {}
    for path in cells.glob("*.json"):
        cell = json.loads(path.read_text())
        if cell.get("kind") == "cell":
            rows[(cell["method"], cell["groups"], cell["fraction"])] = cell
    lines = ["| G | method | KL f=0 | top-1 f=0 | loss f=0 | loss f=0.01 | loss f=0.05 |", "|---|---|---|---|---|---|---|"]
    methods = sorted({m for m, _, _ in rows}, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    for g in groups:
        for m in methods:
            c = [rows.get((m, g, f)) for f in FRACTIONS]
            fmt = lambda x, k, p=4: f"{x[k]:.{p}f}" if x else "-"  # noqa: E731
            lines.append(f"| {g} | {m} | {fmt(c[0], 'kl')} | {fmt(c[0], 'top1_agreement', 3)} | "
                         f"{fmt(c[0], 'heldout_loss')} | {fmt(c[1], 'heldout_loss')} | {fmt(c[2], 'heldout_loss')} |")
    return "\n".join(lines), rows


def targets(rows: dict, groups: list[int]) -> list[str]:
    out = []
    for g in groups:
        mean0, mean05 = rows.get(("mean", g, 0.0)), rows.get(("mean", g, 0.05))
        new0 = {m: rows[(m, g, 0.0)] for m in NEW if (m, g, 0.0) in rows}
        if not (mean0 and mean05 and new0):
            continue
        best = min(new0, key=lambda m: new0[m]["kl"])
        ratio = new0[best]["kl"] / mean0["kl"]
        out.append(f"G={g}: best new method by KL is {best}: KL {new0[best]['kl']:.4f} = {ratio:.2f}x mean's "
                   f"{mean0['kl']:.4f} (target <= 0.33x: {'met' if ratio <= 1 / 3 else 'not met'})")
        if (best, g, 0.01) in rows:
            loss = rows[(best, g, 0.01)]["heldout_loss"]
            out.append(f"G={g}: {best} at f=0.01 loss {loss:.4f} vs mean at f=0.05 {mean05['heldout_loss']:.4f} "
                       f"(target <=: {'met' if loss <= mean05['heldout_loss'] else 'not met'})")
        best01 = min((m for m in NEW if (m, g, 0.01) in rows), key=lambda m: rows[(m, g, 0.01)]["heldout_loss"])
        out.append(f"G={g}: lowest f=0.01 loss among new methods: {best01} "
                   f"{rows[(best01, g, 0.01)]['heldout_loss']:.4f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="runs/bench-methods")
    parser.add_argument("--full-original", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument("--uptrain-lr", type=float, default=None, help="[default: the tiny ablation's 5e-4]")
    parser.add_argument("--original", default=None, help="an original built by an earlier run (its results/original)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="uptraining fractions, a subset of 0,0.01,0.05 (0 alone: fidelity only)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    r = recipe(Path(args.results), args.full_original, tuple(args.methods.split(",")), args.uptrain_lr, args.original,
               tuple(float(f) for f in args.fractions.split(",")))
    started = time.perf_counter()
    Ablation(r, progress=not args.quiet).run()
    text, rows = table(Path(args.results).resolve() / "cells", list(r.groups))
    original = json.loads((Path(args.results).resolve() / "cells" / "original.json").read_text())
    print(f"original: {original['heads']} heads, held-out loss {original['heldout_loss']:.4f}, "
          f"{original['original_steps']} pretraining steps; this run took {time.perf_counter() - started:.0f} s")
    print(text)
    print("\n".join(targets(rows, list(r.groups))))


if __name__ == "__main__":
    sys.exit(main())
