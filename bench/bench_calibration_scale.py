"""`fit` and `mean` on random bf16 llamas of width 2048 at 2 and 8 layers: wall time and peak RSS side by side.

    .venv/bin/python bench/bench_calibration_scale.py [--work runs/bench-calibration] [--samples 64] [--device cpu]

Calibration streams the source one block at a time (convert/methods/block_stream.py), so fit's peak RSS should barely grow
with depth: the target is at most 1.25x from 2 to 8 layers and under 2 GiB at 8. Each conversion runs in its own
process; its peak RSS is the kernel's maxrss for that process. Also printed: how long fit spent in the calibration
forward and in the rest (the least-squares solves and writing), the second target being rest <= forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_BUILD = """
import sys, torch
from gqa_toolkit.families.presets import PRESETS
torch.manual_seed(0)
PRESETS["llama-2048-wide"].model(num_hidden_layers=int(sys.argv[2])).to(torch.bfloat16).save_pretrained(sys.argv[1])
"""

_CONVERT = """
import json, sys, time, torch
import gqa_toolkit.convert.api as api
spent = {{"calibration_s": 0.0}}

class Timed(api.BlockStream):  # the calibration forward: building the stream, then each block as it runs
    def __init__(self, *args, **kwargs):
        t0 = time.perf_counter()
        super().__init__(*args, **kwargs)
        spent["calibration_s"] += time.perf_counter() - t0

    def __iter__(self):
        blocks = super().__iter__()
        while True:
            t0 = time.perf_counter()
            try:
                item = next(blocks)
            except StopIteration:
                return
            finally:
                spent["calibration_s"] += time.perf_counter() - t0
            yield item

api.BlockStream = Timed
t0 = time.perf_counter()
tokens = torch.randint(0, 8192, ({samples}, 128), generator=torch.Generator().manual_seed(0))
api.convert_checkpoint(sys.argv[1], sys.argv[2], method=sys.argv[3], groups=4, force=True, progress=False,
                       calibration=tokens if sys.argv[3] == "fit" else None, device="{device}")
spent["wall_s"] = time.perf_counter() - t0
print(json.dumps(spent))
"""


def run_measured(code: str, *args: str) -> tuple[dict, float]:
    """(the JSON the child printed last, or {}; the child's peak RSS in MiB)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{args} failed with status {status}")
    lines = out.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-calibration")
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences of 128 tokens")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in (2, 8):
        src = work / f"llama-2048-{layers}l"
        if not (src / "config.json").exists():
            run_measured(_BUILD, str(src), str(layers))
        size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**30
        for method in ("mean", "fit"):
            t0 = time.perf_counter()
            spent, rss = run_measured(_CONVERT.format(samples=args.samples, device=args.device), str(src),
                                      str(work / f"out-{layers}l-{method}"), method)
            rows.append(dict(layers=layers, size=size, method=method, wall=time.perf_counter() - t0, rss=rss,
                             calibration=spent.get("calibration_s", 0.0), convert=spent.get("wall_s", 0.0)))
            print(f"  {layers} layers {method}: {rows[-1]['wall']:.1f} s, peak RSS {rss:.0f} MiB", flush=True)

    print(f"\nwidth 2048, G=4, {args.samples} x 128 calibration tokens, device {args.device}, "
          f"{os.cpu_count()} CPUs\n")
    print("| layers | checkpoint GiB | method | wall s (process) | calibration forward s | rest s | peak RSS MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        rest = r["convert"] - r["calibration"] if r["method"] == "fit" else r["convert"]
        calib = f"{r['calibration']:.1f}" if r["method"] == "fit" else ""
        print(f"| {r['layers']} | {r['size']:.2f} | {r['method']} | {r['wall']:.1f} | {calib} | {rest:.1f} | "
              f"{r['rss']:.0f} |")
    fit = {r["layers"]: r for r in rows if r["method"] == "fit"}
    growth = fit[8]["rss"] / fit[2]["rss"]
    print(f"\nfit peak RSS 8 layers / 2 layers: {growth:.2f}x (target <= 1.25x); at 8 layers "
          f"{fit[8]['rss'] / 1024:.2f} GiB (target < 2 GiB)")
    for layers, r in fit.items():
        rest = r["convert"] - r["calibration"]
        print(f"fit {layers} layers: calibration forward {r['calibration']:.1f} s, rest (solves, writing) "
              f"{rest:.1f} s: {rest / max(r['calibration'], 1e-9):.2f}x the forward (target <= 1x)")


if __name__ == "__main__":
    main()
