"""Benchmark of gqa-convert against `cp -r` and the naive transformers route, on a random ~1B-parameter MHA llama.

    .venv/bin/python bench/bench_convert.py            # ~0.94B parameters, bf16, 3 shards
    .venv/bin/python bench/bench_convert.py --small    # ~0.1B, a quick sanity run
    .venv/bin/python bench/bench_convert.py --layers 8 --hidden 1024 --workdir /scratch

It writes a random bf16 llama checkpoint (the names and shapes of stock `LlamaForCausalLM`, sharded with an index)
into a temporary directory, then times three routes to a G=8 checkpoint, each in a fresh child process so that its
peak RSS is its own:

1. `cp -r` of the model directory, the floor for any route that writes a new copy;
2. `gqa-convert --groups 8 --method mean`, which streams tensor by tensor;
3. the naive route: `AutoModelForCausalLM.from_pretrained`, mean-pool each layer's k_proj/v_proj, `save_pretrained`.

Before every run the previous run's dirty pages are flushed with `sync` and the source is read once, so all routes
start from the same warm cache (the page cache is not dropped: that would also evict torch's own libraries, and time
a cold start of Python rather than the conversion). Each route runs --repeats times. It prints a markdown
table with the targets for gqa-convert (wall time within 1.5x of `cp -r`, peak RSS under 1 GB), and checks the
converted checkpoints' config and K/V shapes from their headers. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GQA_CONVERT = shutil.which("gqa-convert", path=str(Path(sys.executable).parent)) or shutil.which("gqa-convert")
TARGET_WALL_RATIO = 1.5
TARGET_PEAK_RSS_MB = 1000

# Runs one route and reports its own wall time and peak RSS. It is a small, fresh process: a child's ru_maxrss
# starts from its parent's at fork, so the route must not be forked from the benchmark, which holds tensors.
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:], stdout=sys.stderr)
wall = time.perf_counter() - start
print(json.dumps({"code": code, "wall_s": wall, "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

# The naive route, as a user without the toolkit would write it: the whole model in memory, pooled in place.
NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()  # quiet, as gqa-convert runs with --quiet
src, out, groups = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, info = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, output_loading_info=True)
problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
if problems:
    sys.exit(f"stock transformers does not accept the checkpoint: {problems}")
cfg = model.config
G0, hd = cfg.num_key_value_heads, cfg.head_dim
with torch.no_grad():
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            w = proj.weight  # (G0 * hd, D)
            pooled = w.float().reshape(groups, G0 // groups, hd, -1).mean(dim=1)  # (G, hd, D)
            proj.weight = torch.nn.Parameter(pooled.reshape(groups * hd, -1).to(w.dtype))  # (G * hd, D)
            proj.out_features = groups * hd
        attn.num_key_value_groups = cfg.num_attention_heads // groups
cfg.num_key_value_heads = groups
model.save_pretrained(out)
"""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    shards: int


FULL = ModelShape(layers=16, hidden=2048, heads=16, intermediate=5504, vocab=32000, shards=3)
SMALL = ModelShape(layers=8, hidden=768, heads=16, intermediate=2048, vocab=32000, shards=2)


@dataclass(frozen=True)
class Result:
    route: str
    wall_s: list[float]  # one per repeat
    peak_rss_mb: list[float]

    @property
    def median_wall_s(self) -> float:
        return statistics.median(self.wall_s)


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, intermediate_size=shape.intermediate,
                       vocab_size=shape.vocab, dtype="bfloat16")


def llama_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of stock LlamaForCausalLM's state dict, from a model built on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def split_shards(shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Consecutive names in shards of about equal bytes."""
    sizes = {name: _numel(s) for name, s in shapes.items()}
    per_shard = sum(sizes.values()) / shards
    out: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if out[-1] and filled + size > per_shard * len(out) and len(out) < shards:
            out.append([])
        out[-1].append(name)
        filled += size
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def build_checkpoint(model_dir: Path, shape: ModelShape) -> int:
    """Random bf16 weights written shard by shard (one shard in memory at a time); returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(shape)
    shapes = llama_tensor_shapes(config)
    shards = split_shards(shapes, shape.shards)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for file, shard in zip(names, shards):
        tensors = {}
        for name in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[name], dtype=torch.bfloat16)
                tensors[name] = t.normal_(0.0, config.initializer_range, generator=generator)
        save_file(tensors, model_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del tensors
    total_size = sum(_numel(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(model_dir)
    return sum(_numel(s) for s in shapes.values())


def warm_read(model_dir: Path) -> None:
    """Read every file once, 16 MiB at a time, so each route starts with the source in the page cache."""
    buffer = bytearray(16 * 2**20)
    for path in sorted(model_dir.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def measure_once(route: str, command: list[str], src: Path, out: Path) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one run, which leaves its output at out."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)  # the previous run's dirty pages are not written back during this one
    warm_read(src)
    print(f"running {route}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-S", "-c", MEASURE, *command], stdout=subprocess.PIPE, text=True,
                          check=True)
    report = json.loads(done.stdout)
    if report["code"] != 0:
        raise SystemExit(f"{route} failed with exit code {report['code']}; its output is above")
    return report["wall_s"], report["peak_rss_kb"] * 1024 / 1e6


def check_output(out: Path, groups: int, config) -> list[str]:
    """Config and every K/V shape from the output's headers, no tensor data read; returns the problems found."""
    from transformers import AutoConfig

    from gqa_toolkit.convert.io.reader import read_safetensors_header

    problems = []
    loaded = AutoConfig.from_pretrained(out)
    if loaded.num_key_value_heads != groups:
        problems.append(f"config num_key_value_heads is {loaded.num_key_value_heads}, expected {groups}")
    shapes = {i.name: i.shape for p in sorted(out.glob("*.safetensors")) for i in read_safetensors_header(p)}
    kv_shape = (groups * config.head_dim, config.hidden_size)
    for layer in range(config.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            if shapes.get(name) != kv_shape:
                problems.append(f"{name} has shape {shapes.get(name)}, expected {kv_shape}")
    q_name = "model.layers.0.self_attn.q_proj.weight"
    if shapes.get(q_name) != (config.hidden_size, config.hidden_size):
        problems.append(f"{q_name} has shape {shapes.get(q_name)}, expected unchanged")
    return problems


def table(results: list[Result]) -> str:
    base = results[0].median_wall_s
    rows = ["| route | wall s | peak RSS MB | wall ratio vs cp -r | target | met |",
            "|---|---:|---:|---:|---|---|"]
    for r in results:
        ratio = r.median_wall_s / base
        if r.route == "gqa-convert":
            target = f"wall <= {TARGET_WALL_RATIO}x cp -r, RSS < {TARGET_PEAK_RSS_MB} MB"
            met = "wall " + ("yes" if ratio <= TARGET_WALL_RATIO else "NO") + ", RSS " + (
                "yes" if max(r.peak_rss_mb) < TARGET_PEAK_RSS_MB else "NO")
        else:
            target, met = "(reference)", ""
        rows.append(f"| {r.route} | {r.median_wall_s:.2f} | {max(r.peak_rss_mb):.0f} | {ratio:.2f}x | {target} "
                    f"| {met} |")
    return "\n".join(rows)


def check_shape(shape: ModelShape, groups: int, repeats: int) -> None:
    """Every problem with the requested sizes at once, before minutes go into building a checkpoint."""
    problems = [f"--{f} {getattr(shape, f)} must be at least 1" for f in ModelShape.__dataclass_fields__
                if getattr(shape, f) < 1]
    if shape.heads >= 1 and shape.hidden % shape.heads:
        problems.append(f"--hidden {shape.hidden} is not a multiple of --heads {shape.heads}")
    if groups < 1 or (shape.heads >= 1 and shape.heads % groups):
        problems.append(f"--groups {groups} does not divide --heads {shape.heads}")
    if repeats < 1:
        problems.append(f"--repeats {repeats} must be at least 1")
    if problems:
        raise SystemExit("bench_convert: " + "; ".join(problems))


def make_workdir(parent: str | None) -> Path:
    parent_dir = Path(parent or tempfile.gettempdir()).resolve()
    if parent_dir == REPO or REPO in parent_dir.parents:
        raise SystemExit(f"--workdir {parent_dir} is inside the repository {REPO}; choose a directory outside it, "
                         f"e.g. /tmp, so no weights land in the working tree")
    parent_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="bench_convert-", dir=parent_dir))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a ~0.1B model, for a quick sanity run")
    for field in ModelShape.__dataclass_fields__:
        p.add_argument(f"--{field}", type=int, default=None, help=f"model {field} [default: {getattr(FULL, field)}, "
                                                                 f"{getattr(SMALL, field)} with --small]")
    p.add_argument("--groups", type=int, default=8, help="KV heads in the converted checkpoint [default: 8]")
    p.add_argument("--repeats", type=int, default=3, help="runs per route; the table shows the median wall time "
                                                          "and the largest peak RSS [default: 3]")
    p.add_argument("--workdir", default=None, help="parent of the temporary directory [default: the system temp "
                                                   "directory, /tmp]")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if GQA_CONVERT is None:
        raise SystemExit(f"no gqa-convert beside {sys.executable} or on PATH; set up the project (scripts/setup.sh) "
                         f"and run this with .venv/bin/python")
    defaults = SMALL if args.small else FULL
    shape = ModelShape(**{f: getattr(args, f) if getattr(args, f) is not None else getattr(defaults, f)
                          for f in ModelShape.__dataclass_fields__})
    check_shape(shape, args.groups, args.repeats)
    work = make_workdir(args.workdir)
    try:
        src = work / "llama-mha"
        src.mkdir()
        start = time.perf_counter()
        params = build_checkpoint(src, shape)
        size_mb = sum(p.stat().st_size for p in src.iterdir()) / 1e6
        print(f"built {src}: {params / 1e9:.3f}B parameters, bf16, {size_mb:.0f} MB in {shape.shards} shards "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)

        outs = {"cp -r": work / "copy", "gqa-convert": work / "gqa-convert", "naive": work / "naive"}
        routes = {
            "cp -r": ["cp", "-r", str(src), str(outs["cp -r"])],
            "gqa-convert": [str(GQA_CONVERT), "--groups", str(args.groups), "--method", "mean", "--quiet",
                            "--output", str(outs["gqa-convert"]), str(src)],
            "naive": [sys.executable, "-c", NAIVE, str(src), str(outs["naive"]), str(args.groups)],
        }
        results, checks = [], {}
        load_before = os.getloadavg()[0]
        config = llama_config(shape)
        for route, command in routes.items():
            runs = [measure_once(route, command, src, outs[route]) for _ in range(args.repeats)]
            results.append(Result(route, [r[0] for r in runs], [r[1] for r in runs]))
            if route != "cp -r":
                checks[route] = check_output(outs[route], args.groups, config)
            shutil.rmtree(outs[route])

        print(f"\nModel: llama, {params / 1e9:.3f}B parameters, bf16, {size_mb:.0f} MB in {shape.shards} shards "
              f"({shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, intermediate {shape.intermediate}, "
              f"vocab {shape.vocab}); MHA -> {args.groups} KV heads, method mean.")
        print("Cache: before each run, the previous run's output is deleted and dirty pages flushed (sync), and the "
              "source is read once, so every run starts from a warm cache. The page cache is not dropped: that would "
              "also evict torch's libraries and time a cold start of Python. Wall time excludes the final writeback "
              "to disk, as cp -r does not wait for it either.")
        print(f"Machine: {os.cpu_count()} CPU cores; 1-minute load average {load_before:.2f} before the runs, "
              f"{os.getloadavg()[0]:.2f} after (other work on the machine skews the figures). {args.repeats} runs per "
              f"route: median wall time, largest peak RSS; every run's own process measured.\n")
        print(table(results))
        print()
        print(f"Routes: cp -r SRC DST | gqa-convert --groups {args.groups} --method mean --quiet --output DST SRC | "
              f"naive: from_pretrained(SRC, dtype=torch.bfloat16), mean-pool k_proj/v_proj, save_pretrained(DST)")
        for r in results:
            print(f"{r.route}: wall s per run {', '.join(f'{w:.2f}' for w in r.wall_s)}")
        print()
        for route, problems in checks.items():
            status = "ok" if not problems else "FAILED: " + "; ".join(problems)
            print(f"check {route} output: config num_key_value_heads={args.groups} and K/V shapes "
                  f"({args.groups * config.head_dim}, {config.hidden_size}) in every layer (headers only): {status}")
        if any(checks.values()):
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
