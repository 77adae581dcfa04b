"""The GPU check: what only a GPU can tell, in one command that writes one markdown report.

    python bench/gpu_check.py            # on a machine with one GPU, about 8 minutes: writes docs/gpu_check.md
    python bench/gpu_check.py --small    # tiny shapes on the CPU, about 3 minutes: docs/gpu_check_small.md

Four stages run in order, each in its own process with its own time limit, so that one that fails or runs out of
time is reported and the next still runs:

1. fit-precision: `fit`'s solves for one 7B-shaped attention layer (d 4096, 32 heads of 128, 32 -> 8 KV heads,
   weighed by calibration moments): float64 on the CPU (what gqa-convert runs), then float64 and float32 on the
   GPU. Wall time, and how far each result moves the layer's function from the CPU float64 one: query-key scores
   and the value-output path on random inputs (both are unchanged by the maps the fit folds into Q and O).
2. fit-7b: `gqa-convert --method fit --device cuda` of a random llama-7b-shaped checkpoint in bf16 (--layers of its
   32 layers): wall time and peak GPU memory.
3. parity-bf16: tests/test_convert_parity.py and tests/test_modeling_decoding.py with every model on the GPU in
   bfloat16 (tests/conftest.py: GQA_TEST_DEVICE, GQA_TEST_DTYPE; tolerances BF16_TOLERANCE).
4. speed: `gqa-eval speed` of a random llama-1b (16 MHA heads) converted to 4 KV heads, against its source.

Nothing is downloaded: weights are random, tokenizers are learnt from the python-stdlib corpus, and transformers'
hub kernels are off (USE_HUB_KERNELS=NO; the toolkit also loads with use_kernels=False), so every figure is
transformers' own torch code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# stage -> seconds allowed (full run, small run)
LIMITS = {"fit-precision": (90, 120), "fit-7b": (180, 240), "parity-bf16": (150, 480), "speed": (180, 240)}
TITLES = {"fit-precision": "fit: float32 against float64 solves", "fit-7b": "7B-shaped fit --device cuda",
          "parity-bf16": "Parity and cached decoding in bfloat16", "speed": "gqa-eval speed of a converted 1B"}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"the CPU ({os.cpu_count()} cores)"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def moved(obj, device: str, dtype: torch.dtype):
    """A frozen dataclass of tensors with its floating tensors on `device` in `dtype`."""
    changes = {f.name: getattr(obj, f.name).to(device, dtype) for f in dataclasses.fields(obj)
               if isinstance(getattr(obj, f.name), torch.Tensor) and getattr(obj, f.name).is_floating_point()}
    return dataclasses.replace(obj, **changes)


def layer_function(w: dict, heads: int, groups: int, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-key scores (H, n, n) and the value-output path summed over heads (n, d_out) on inputs xs (n, d):
    what a conversion must keep, whatever maps it folds into Q and O."""
    hd = w["q"].shape[0] // heads
    q = (xs @ w["q"].double().T).view(len(xs), heads, hd).transpose(0, 1)  # (H, n, hd)
    k = (xs @ w["k"].double().T).view(len(xs), groups, hd).transpose(0, 1)  # (G, n, hd)
    v = (xs @ w["v"].double().T).view(len(xs), groups, hd).transpose(0, 1)  # (G, n, hd)
    k, v = k.repeat_interleave(heads // groups, 0), v.repeat_interleave(heads // groups, 0)  # (H, n, hd)
    o = w["o"].double().view(w["o"].shape[0], heads, hd)  # (d_out, H, hd)
    return q @ k.transpose(1, 2), torch.einsum("hni,dhi->nd", v, o)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def stage_fit_precision(args) -> str:
    from gqa_toolkit.convert.methods.layer import AttentionWeights, InputMoments, RopeLayout, convert_layer
    from gqa_toolkit.convert.methods.layer_types import PerHeadWeights, LayerContext
    from gqa_toolkit.convert.methods.registry import layer_methods

    d, heads, hd, groups, tokens = (64, 4, 16, 2, 512) if args.small else (4096, 32, 128, 8, 8192)
    g = torch.Generator().manual_seed(0)
    w = AttentionWeights(*(torch.randn(*shape, generator=g, dtype=torch.float64) * 0.02
                           for shape in ((heads * hd, d), (heads * hd, d), (heads * hd, d), (d, heads * hd))))
    # calibration inputs with a decaying spectrum, so that the weighing matters
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) / (1 + torch.arange(d, dtype=torch.float64) / 64)
    moments, rope = InputMoments.from_inputs(x), RopeLayout(hd, hd)
    xs = torch.randn(64, d, generator=g, dtype=torch.float64)

    t0 = time.perf_counter()
    reference = convert_layer(w, heads=heads, kv_heads=heads, groups=groups, method="fit", rope=rope,
                              calibration=moments)
    rows = [("CPU, float64 (gqa-convert)", time.perf_counter() - t0, 0.0, 0.0)]
    scores_ref, values_ref = layer_function(dataclasses.asdict(reference), heads, groups, xs)

    block = PerHeadWeights.from_weights(w, heads, heads)
    ctx = LayerContext.build(block, rope, moments, seed=0, init_std=0.02, names={})
    for dtype in (torch.float64, torch.float32):
        b, c = moved(block, args.device, dtype), moved(ctx, args.device, dtype)
        with torch.device(args.device):  # tensors the solves make (identities) land beside their inputs
            layer_methods()["fit"](b, groups, c)  # warm-up: kernels and solver workspaces
            synchronize(args.device)
            t0 = time.perf_counter()
            out = b.assembled(layer_methods()["fit"](b, groups, c), rope)
            synchronize(args.device)
        seconds = time.perf_counter() - t0
        scores, values = layer_function({k: out[k].cpu() for k in "qkvo"}, heads, groups, xs)
        rows.append((f"{args.device}, {str(dtype).removeprefix('torch.')}", seconds,
                     relative_error(scores, scores_ref), relative_error(values, values_ref)))
    lines = [f"One attention layer, d {d}, {heads} heads of {hd}, {heads} -> {groups} KV heads, calibration "
             f"moments of {tokens} tokens; errors are relative (Frobenius) to the CPU float64 result, on 64 random "
             "inputs.", "", "| solves on | seconds | query-key scores error | value-output error |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s:.3f} | {e1:.1e} | {e2:.1e} |" for name, s, e1, e2 in rows]
    return "\n".join(lines)


def write_random_llama(preset_name: str, out: Path, vocab: int, device: str, **overrides) -> Path:
    """A random llama of a preset's shape in bf16, with a byte-level BPE tokenizer learnt from python-stdlib."""
    from gqa_toolkit import corpus
    from gqa_toolkit.families.presets import PRESETS
    from gqa_toolkit.uptrain.tokenizer import train_tokenizer

    texts = corpus.iter_texts("train", limit=50 if vocab <= 512 else 200)
    tokenizer = train_tokenizer((r["text"] for r in texts), vocab_size=vocab)
    torch.manual_seed(0)
    with torch.device(device):
        model = PRESETS[preset_name].model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, **overrides).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def stage_fit_7b(args) -> str:
    from gqa_toolkit.convert.cli import main as gqa_convert

    preset, groups = ("tiny-llama", 2) if args.small else ("llama-7b", 8)
    samples, length = (16, 32) if args.small else (64, 256)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        src = write_random_llama(preset, Path(tmp) / "src", 512 if args.small else 8192, args.device,
                                 num_hidden_layers=args.layers)
        written = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        command = [str(src), "--groups", str(groups), "--method", "fit", "--device", args.device,
                   "--calibration-samples", str(samples), "--calibration-length", str(length), "-q",
                   "-o", str(Path(tmp) / "out")]
        t0 = time.perf_counter()
        gqa_convert(command, standalone_mode=False)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        config = json.loads((src / "config.json").read_text())
    return "\n".join([
        f"A random `{preset}` (hidden {config['hidden_size']}, {config['num_attention_heads']} heads, "
        f"{config['num_hidden_layers']} layers, vocabulary {config['vocab_size']}) in bf16, written in "
        f"{written:.1f} s, converted with `gqa-convert SRC {' '.join(command[1:-2])}`.", "",
        "| layers | wall s | s per layer | peak GPU memory GiB |", "|---:|---:|---:|---:|",
        f"| {config['num_hidden_layers']} | {seconds:.1f} | {seconds / config['num_hidden_layers']:.2f} | "
        f"{peak:.2f} |"])


def stage_parity_bf16(args) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import BF16_TOLERANCE

    tests = ["tests/test_convert_parity.py", "tests/test_modeling_decoding.py"]
    select = ["-k", "llama or gpt2 or t5"] if args.small else []  # the small run keeps to three families
    env = {**os.environ, "GQA_TEST_DEVICE": args.device, "GQA_TEST_DTYPE": "bfloat16"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *tests, *select],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    summary = [line for line in lines if " passed" in line or " failed" in line or " error" in line][-1:]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    worst = [line.lstrip(".") for line in lines if "largest |cached - full|" in line]
    return "\n".join([
        f"`{' '.join(tests)}` with every model on {args.device} in bfloat16. Tolerances: the tests' own in float32; "
        f"in bfloat16 `assert_close(rtol={BF16_TOLERANCE['rtol']}, atol={BF16_TOLERANCE['atol']})` for logits "
        "(converted against reference, cached against full forwards); greedy decoding must match token for token.",
        "", f"Result: **{summary[0].strip(' =') if summary else 'no summary (see below)'}**", "",
        *(f"- {line}" for line in failures[:20]),
        *(["", "Largest |cached - full| per family and attention:", "```", *worst, "```"] if worst else []),
        *(["", "```", *done.stdout.splitlines()[-30:], "```"] if done.returncode and not failures else [])])


def stage_speed(args) -> str:
    from gqa_toolkit.convert import convert_checkpoint

    preset, groups = ("tiny-llama", 2) if args.small else ("llama-1b-mha", 4)
    contexts, batches, rounds = ("32", "1", "1") if args.small else ("512,2048", "1,16", "3")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = write_random_llama(preset, Path(tmp) / "src", 512 if args.small else 8192, args.device)
        out = convert_checkpoint(src, Path(tmp) / "gqa", method="mean", groups=groups, progress=False)
        command = [sys.executable, "-m", "gqa_toolkit.eval", "speed", str(out), "--contexts", contexts,
                   "--batch-sizes", batches, "--repeats", rounds, "--json"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows = json.loads(done.stdout)
        attention = json.loads((out / "config.json").read_text()).get("_attn_implementation") or "sdpa (default)"
    lines = [f"A random `{preset}` converted to {groups} KV heads (mean); `gqa-eval speed GQA_DIR --contexts "
             f"{contexts} --batch-sizes {batches}` on {args.device}, attention {attention}, no hub kernels.", "",
             "| model | KV bytes/token | context | batch | prefill tok/s | decode tok/s | decode vs source |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['kv_bytes_per_token']:.0f} | {r['context']} | {r['batch_size']} | "
              f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
              f"{r['decode_vs_source']:.2f}x |" for r in rows]
    return "\n".join(lines)


STAGES = {"fit-precision": stage_fit_precision, "fit-7b": stage_fit_7b, "parity-bf16": stage_parity_bf16,
          "speed": stage_speed}


def run_stage(name: str, args, limit: int) -> tuple[str, float, str]:
    """(status, seconds, markdown) of one stage run in its own process."""
    with tempfile.NamedTemporaryFile("r", suffix=".md") as result:
        command = [sys.executable, __file__, "--stage", name, "--stage-output", result.name, "--device", args.device,
                   "--layers", str(args.layers), *(["--small"] if args.small else []),
                   *(["--workdir", args.workdir] if args.workdir else [])]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return f"timed out ({limit} s)", time.perf_counter() - t0, ""
        seconds = time.perf_counter() - t0
        if done.returncode:
            return f"failed (exit {done.returncode})", seconds, "```\n" + done.stderr[-3000:] + "\n```"
        return "ok", seconds, Path(result.name).read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: proves the script runs")
    parser.add_argument("--device", default=None, help="[default: cuda, or cpu with --small]")
    parser.add_argument("--layers", type=int, default=None, help="layers of the 7B shape [default: 4; 2 with --small]")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages [{','.join(STAGES)}]")
    parser.add_argument("--report", default=None, help="[default: docs/gpu_check.md, docs/gpu_check_small.md]")
    parser.add_argument("--workdir", default=None, help="folder for the random checkpoints [default: the temp dir]")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--stage-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.small else "cuda")
    args.layers = args.layers or (2 if args.small else 4)
    os.environ.update(USE_HUB_KERNELS="NO", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.stage:  # one stage, in this process
        Path(args.stage_output).write_text(STAGES[args.stage](args))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine, or with --small on the CPU")

    import transformers

    report = Path(args.report or ROOT / "docs" / ("gpu_check_small.md" if args.small else "gpu_check.md"))
    sections = [f"# GPU check{' (small, CPU)' if args.small else ''}", "",
                f"`python bench/gpu_check.py{' --small' if args.small else ''}` on {device_name(args.device)}, "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: torch {torch.__version__}, transformers "
                f"{transformers.__version__}; hub kernels off (USE_HUB_KERNELS=NO, use_kernels=False).", ""]
    for name in args.only.split(","):
        limit = LIMITS[name][1 if args.small else 0]
        status, seconds, body = run_stage(name, args, limit)
        print(f"{name}: {status} in {seconds:.0f} s", flush=True)
        sections += [f"## {TITLES[name]}", "", f"Stage `{name}`: {status}, {seconds:.0f} s (limit {limit} s).", "",
                     body, ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(sections))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
