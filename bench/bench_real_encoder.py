"""GQA on a real pretrained bidirectional encoder: whisper-base's encoder self-attention (6 layers, 8 heads of 64,
1500 positions) converted to G=4 and G=1 through the layer API, the route for people's own encoders.

    nice -n 15 .venv/bin/python bench/bench_real_encoder.py [--groups 4 1] [--cells mean fit fit-cal ...]
        [--check-cli]

Each layer's q, k, v, o go through `convert_layer(..., causal=False, rope=RopeLayout(64, 0))`; the decoder and the
cross-attention are untouched (8 KV heads). The converted encoder is run with its K/V heads repeated back to the 8
query heads, which computes what a GQA encoder computes (`--check-cli` checks this against gqa-convert's own
output and modeling, `--attention all -g 8 --kind-groups encoder=4`, on two clips).

Calibration: the attention inputs (each layer's self_attn_layer_norm output) of clips 00-19 over the whole 30 s
window (or, in the `-speech` cells, only the positions that hold the clip's audio), from the source's encoder
(source mode) or from the already converted layers before it (sequential mode); refinement trains on them
(batches of 8 clips, the last batch held out to pick the best checkpoint). Scored on the held-out clips 20-39:
cosine between the original's and the converted encoder's last_hidden_state per position (averaged), and of the
mean-pooled embedding per clip (averaged over clips), each over the positions that hold the clip's audio (50
positions per second of it) and over the whole 1500-position window.

The source's layer inputs and outputs are cached in --work (one encoder forward over 40 clips); each finished cell is
appended to --work/results.jsonl so a rerun measures only new cells; the table goes to docs/real-encoder.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speech import load_speech  # noqa: E402

from gqa_toolkit.convert.methods.layer import AttentionWeights, RopeLayout, convert_layer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared-models"
CALIBRATION, HELD_OUT = range(0, 20), range(20, 40)
SAMPLES_PER_POSITION = 320  # 16 kHz, 160 samples per mel frame, 2 frames per encoder position
BATCH = 4  # clips per encoder forward: 4 x 8 heads x 1500^2 attention scores stay under 0.3 GB
CELLS = {  # label -> convert_layer settings; "calibrated" uses clips 00-19, "sequential" the converted prefix
    "mean": dict(method="mean"),
    "fit": dict(method="fit"),
    "fit-cal": dict(method="fit", calibrated=True),
    "fit-cal-seq": dict(method="fit", calibrated=True, sequential=True),
    "fit-cal-refine50": dict(method="fit", calibrated=True, refine_steps=50),
    "fit-cal-refine100": dict(method="fit", calibrated=True, refine_steps=100),
    "fit-cal-seq-refine50": dict(method="fit", calibrated=True, sequential=True, refine_steps=50),
    "fit-cal-seq-refine100": dict(method="fit", calibrated=True, sequential=True, refine_steps=100),
    "fit-cal-seq-refine100-lr03": dict(method="fit", calibrated=True, sequential=True, refine_steps=100,
                                       refine_lr=0.03),
    "fit-cal-refine100-lr003": dict(method="fit", calibrated=True, refine_steps=100, refine_lr=0.003),
    "aligned-cal": dict(method="aligned", calibrated=True),
    "fit-cal-speech": dict(method="fit", calibrated="speech"),
    "fit-cal-seq-speech": dict(method="fit", calibrated="speech", sequential=True),
}
PREFIX = "self_attn."


class SourceEncoder:
    """whisper-base's encoder, and what it computes on the clips, cached: each layer's input on the calibration
    clips, the first layer's input and the final output on the held-out clips."""

    def __init__(self, source: Path, speech: Path, work: Path):
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
        self.encoder = model.model.encoder
        self.config = model.config
        self.clips, _ = load_speech(speech)
        self.extractor = WhisperFeatureExtractor.from_pretrained(source)
        self.speech_positions = [min(1500, math.ceil(len(c) / SAMPLES_PER_POSITION)) for c in self.clips]
        cache = work / "whisper-base-encoder-cache.pt"
        if not cache.is_file():
            torch.save(self._run_source(), cache)
        self.cached = torch.load(cache, weights_only=True)

    @torch.no_grad()
    def _run_source(self) -> dict:
        inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(self.encoder.layers))}

        def record(index: int):
            def hook(module, args, kwargs):
                inputs[index].append(args[0] if args else kwargs["hidden_states"])
            return hook

        hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True)
                 for i, layer in enumerate(self.encoder.layers)]
        t0 = time.perf_counter()
        outputs = []
        try:
            for start in range(0, len(self.clips), BATCH):
                outputs.append(self.encoder(self.features(range(start, start + BATCH))).last_hidden_state)
        finally:
            for h in hooks:
                h.remove()
        seconds = time.perf_counter() - t0
        print(f"source encoder on {len(self.clips)} clips: {seconds:.0f} s", flush=True)
        per_layer = [torch.cat(inputs[i]) for i in range(len(inputs))]  # each (clips, 1500, d)
        return {"calibration_inputs": [x[list(CALIBRATION)] for x in per_layer],
                "held_out_input": per_layer[0][list(HELD_OUT)], "held_out_output": torch.cat(outputs)[list(HELD_OUT)],
                "seconds": seconds}

    def features(self, clips) -> torch.Tensor:
        audio = [self.clips[i] for i in clips]
        return self.extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features  # (B, 80, 3000)

    def attention_weights(self, layer: int) -> AttentionWeights:
        attn = self.encoder.layers[layer].self_attn
        return AttentionWeights(q=attn.q_proj.weight.detach(), k=attn.k_proj.weight.detach(),
                                v=attn.v_proj.weight.detach(), o=attn.out_proj.weight.detach(),
                                q_bias=attn.q_proj.bias.detach(), k_bias=None, v_bias=attn.v_proj.bias.detach())

    @torch.no_grad()
    def run_layers(self, converted: list[AttentionWeights | None], hidden: torch.Tensor, first: int = 0,
                   last: int | None = None, final_norm: bool = True) -> torch.Tensor:
        """Layers first..last (None: to the end) with the given attention weights (None: the source's), and the
        final layer norm when the run reaches the end; `hidden` (B, 1500, d) is layer `first`'s input."""
        layers = self.encoder.layers
        last = len(layers) if last is None else last
        out = []
        for start in range(0, len(hidden), BATCH):
            h = hidden[start:start + BATCH]
            for i in range(first, last):
                params = mha_parameters(converted[i], self.config.encoder_attention_heads) if converted[i] else {}
                h = functional_call(layers[i], params, (h, None))
                h = h[0] if isinstance(h, tuple) else h
            out.append(self.encoder.layer_norm(h) if final_norm and last == len(layers) else h)
        return torch.cat(out)


def mha_parameters(w: AttentionWeights, heads: int) -> dict[str, torch.Tensor]:
    """The encoder layer's attention parameters with G K/V heads repeated to the `heads` query heads: the same
    function as a GQA attention reading KV head h // (heads / G)."""
    hd = w.q.shape[0] // heads
    share = heads // (w.k.shape[0] // hd)

    def repeat(x: torch.Tensor) -> torch.Tensor:  # (G*hd, ...) -> (H*hd, ...)
        return x.reshape(-1, hd, *x.shape[1:]).repeat_interleave(share, 0).flatten(0, 1)

    return {PREFIX + "q_proj.weight": w.q, PREFIX + "q_proj.bias": w.q_bias, PREFIX + "k_proj.weight": repeat(w.k),
            PREFIX + "v_proj.weight": repeat(w.v), PREFIX + "v_proj.bias": repeat(w.v_bias),
            PREFIX + "out_proj.weight": w.o}


def convert_encoder(src: SourceEncoder, groups: int, method: str, calibrated: bool | str = False,
                    sequential: bool = False, refine_steps: int = 0, refine_lr: float = 0.01) -> list[AttentionWeights]:
    """Each encoder layer's attention converted by `convert_layer`; `calibrated`: True for the attention inputs of
    the calibration clips over the whole window, "speech" for their speech positions only; `sequential`: those
    inputs come from the converted layers before (else from the source's)."""
    heads = src.config.encoder_attention_heads
    hd = src.config.d_model // heads
    layers = src.encoder.layers
    converted: list[AttentionWeights] = []
    hidden = src.cached["calibration_inputs"][0] if sequential else None  # the converted prefix's output
    for i, layer in enumerate(layers):
        calibration = None
        if calibrated:
            block_input = hidden if sequential else src.cached["calibration_inputs"][i]
            with torch.no_grad():
                calibration = layer.self_attn_layer_norm(block_input)  # (clips, 1500, d)
            if calibrated == "speech":  # only the positions that hold each clip's audio: (positions, d)
                calibration = torch.cat([calibration[c, :src.speech_positions[i]]
                                         for c, i in enumerate(CALIBRATION)])
        converted.append(convert_layer(src.attention_weights(i), heads=heads, kv_heads=heads, groups=groups,
                                       method=method, rope=RopeLayout(hd, 0), calibration=calibration,
                                       refine_steps=refine_steps, refine_lr=refine_lr, causal=False))
        if sequential and i + 1 < len(layers):
            with torch.no_grad():
                hidden = src.run_layers(converted + [None] * (len(layers) - i - 1), hidden, i, i + 1)
    return converted


def scores(reference: torch.Tensor, output: torch.Tensor, speech_positions: list[int]) -> dict[str, float]:
    """Cosines of (clips, 1500, d) outputs: per position and of the mean-pooled embedding, over each clip's speech
    positions and over the whole window."""
    per_pos_speech, pooled_speech = [], []
    for c, n in enumerate(speech_positions):
        per_pos_speech.append(F.cosine_similarity(reference[c, :n], output[c, :n], dim=-1).mean())
        pooled_speech.append(F.cosine_similarity(reference[c, :n].mean(0), output[c, :n].mean(0), dim=0))
    return {"pooled_cos_speech": float(torch.stack(pooled_speech).mean()),
            "position_cos_speech": float(torch.stack(per_pos_speech).mean()),
            "pooled_cos_window": float(F.cosine_similarity(reference.mean(1), output.mean(1), dim=-1).mean()),
            "position_cos_window": float(F.cosine_similarity(reference, output, dim=-1).mean())}


@torch.no_grad()
def check_cli(src: SourceEncoder, source: Path, work: Path) -> None:
    """gqa-convert's output (its own GQA modeling) against this benchmark's in-process conversion, mean at G=4."""
    from gqa_toolkit.families import modeling  # noqa: F401  registers gqa_whisper
    from transformers import AutoModelForSpeechSeq2Seq

    out = work / "whisper-base-encoder4-mean"
    cmd = [str(ROOT / ".venv" / "bin" / "gqa-convert"), str(source), "-g", "8", "--attention", "all",
           "--kind-groups", "encoder=4", "-m", "mean", "-o", str(out), "--force", "-q"]
    subprocess.run(cmd, check=True)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(out, dtype=torch.float32).eval()
    clips = list(HELD_OUT)[:2]
    theirs = model.model.encoder(src.features(clips)).last_hidden_state
    mine = src.run_layers(convert_encoder(src, 4, "mean"), src.cached["held_out_input"][:2])
    diff = float((theirs - mine).abs().max())
    print(f"gqa-convert output vs in-process conversion (mean, G=4, 2 clips): max |diff| {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise SystemExit("the in-process conversion does not compute what gqa-convert's output computes")


def render(rows: list[dict], csv_path: Path) -> None:
    keys = ["label", "groups", "method", "calibration", "mode", "refine_steps", "refine_lr", "pooled_cos_speech",
            "position_cos_speech", "pooled_cos_window", "position_cos_window", "convert_s", "eval_s", "load_avg"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print("| G | cell | pooled cos (speech) | per-position cos (speech) | pooled cos (30 s window) | "
          "per-position cos (window) | convert s | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (-r["groups"], list(CELLS).index(r["label"]) if r["label"] in CELLS else 99)):
        print(f"| {r['groups']} | {r['label']} | {r['pooled_cos_speech']:.4f} | {r['position_cos_speech']:.4f} | "
              f"{r['pooled_cos_window']:.4f} | {r['position_cos_window']:.4f} | {r['convert_s']:.0f} | "
              f"{r['load_avg']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SHARED / "whisper-base")
    parser.add_argument("--speech", type=Path, default=SHARED / "speech")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real-encoder")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--cells", nargs="+", default=["mean", "fit", "fit-cal", "fit-cal-refine50"],
                        choices=list(CELLS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-cli", action="store_true")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs" / "real-encoder.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    src = SourceEncoder(args.source, args.speech, args.work)
    if args.check_cli:
        check_cli(src, args.source, args.work)
    results = args.work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["label"], r["groups"]) for r in rows}
    speech = [src.speech_positions[i] for i in HELD_OUT]
    for groups in args.groups:
        for label in args.cells:
            if (label, groups) in done:
                continue
            cell = CELLS[label]
            t0 = time.perf_counter()
            converted = convert_encoder(src, groups, **cell)
            convert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            output = src.run_layers(converted, src.cached["held_out_input"])
            row = {"label": label, "groups": groups, "method": cell["method"],
                   "calibration": {True: "clips 00-19", "speech": "clips 00-19, speech positions"}.get(
                       cell.get("calibrated"), "none"),
                   "mode": "sequential" if cell.get("sequential") else "source",
                   "refine_steps": cell.get("refine_steps", 0), "refine_lr": cell.get("refine_lr", 0.01),
                   **scores(src.cached["held_out_output"], output, speech),
                   "convert_s": convert_s, "eval_s": time.perf_counter() - t0, "load_avg": os.getloadavg()[0]}
            print(json.dumps(row), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    render(rows, args.csv)


if __name__ == "__main__":
    main()
