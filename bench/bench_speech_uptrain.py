"""Uptraining for speech on a real whisper: WER against the original's transcripts before and after gqa-uptrain.

    python bench/bench_speech_uptrain.py WHISPER_DIR EVAL_CLIPS [--groups 4] [--method mean] [--minutes 15]

WHISPER_DIR is a stock whisper folder (bench/ of the real-checkpoint benchmark rebuilds openai's whisper-base);
EVAL_CLIPS a folder of wav clips with sentences.txt (line N+1 is the clip NN.wav). Training speech is synthesised
here by espeak-ng (apt-get install espeak-ng) from sentences of its own, none of them in EVAL_CLIPS. The script
converts WHISPER_DIR, measures WER (against the original's greedy transcripts and against the text) and decoder
KL, uptrains with distillation from the original for at most --minutes of wall time (the step budget is set from
the measured time of a first short run), and measures again. It prints every figure and the time it took.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
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


def measure(model: Path, original: tuple | None, data: Path, clips: int) -> tuple[dict, tuple]:
    """WER against the text and, given the original's (transcripts, examples, dir), against its transcripts and
    the decoder's KL to it (on the reference transcripts); also returns this model's (transcripts, examples)."""
    from gqa_toolkit.eval.fidelity import fidelity
    from gqa_toolkit.eval.placement import load_for_eval
    from gqa_toolkit.eval.wer import word_error_rate

    started = time.perf_counter()
    texts, references, examples, _ = transcribe(model, data, clips)
    figures = {"wer_vs_text": word_error_rate(references, texts)}
    if original is not None:
        original_texts, _, original_dir = original
        figures["wer_vs_original"] = word_error_rate(original_texts, texts)
        figures["kl"] = fidelity(load_for_eval(model), load_for_eval(original_dir), examples, 8)["kl"]
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures, (texts, examples, model)


def uptrain(model: Path, source: Path, data: Path, out: Path, steps: int, cache: Path) -> float:
    started = time.perf_counter()
    gqa("gqa-uptrain", "recipes/whisper-uptrain.yaml", f"model.path={model}", f"data.source={data}",
        f"data.cache_dir={cache}", f"data.target_length={TARGET_LENGTH}", f"objective.teacher={source}",
        f"train.max_steps={steps}", "train.batch_size=8",
        "train.micro_batch_size=8", "train.lr=3e-4", "train.warmup_fraction=0.0", "train.precision=fp32",
        "data.eval_blocks=0", f"output.dir={out}", "output.save_every=1000", "output.progress=false",
        "output.trackers=[]")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("whisper", type=Path)
    parser.add_argument("clips", type=Path)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--method", default="mean")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--train-clips", type=int, default=160)
    parser.add_argument("--eval-clips", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-speech-uptrain"))
    args = parser.parse_args()

    work = args.work.resolve()
    started = time.perf_counter()
    train_data = synthesise(work / "train", args.train_clips).parent
    heldout = eval_clips(args.clips, work / "eval").parent
    print(f"data: {args.train_clips} synthesised training clips, {time.perf_counter() - started:.0f} s", flush=True)
    converted = work / f"g{args.groups}-{args.method}"
    if not (converted / "config.json").is_file():
        gqa("gqa-convert", str(args.whisper), "--groups", str(args.groups), "--method", args.method, "--output",
            str(converted))
    original, reference = measure(args.whisper, None, heldout, args.eval_clips)
    print(f"original: {json.dumps(original)}", flush=True)
    before, _ = measure(converted, reference, heldout, args.eval_clips)
    print(f"G={args.groups} {args.method}, before uptraining: {json.dumps(before)}", flush=True)

    probe_steps = 4  # time a short run (features are computed and cached there) to size the real one
    probe = uptrain(converted, args.whisper, train_data, work / "probe", probe_steps, work / "cache")
    probe_again = uptrain(converted, args.whisper, train_data, work / "probe2", probe_steps, work / "cache")
    per_step = probe_again / probe_steps  # an upper bound: it includes loading and saving
    steps = max(1, int(args.minutes * 60 / per_step))
    print(f"probe: {probe:.0f} s (features made), {probe_again:.0f} s again for {probe_steps} steps: "
          f"{steps} steps fit in {args.minutes:g} min", flush=True)
    seconds = uptrain(converted, args.whisper, train_data, work / "uptrained", steps, work / "cache")
    after, _ = measure(work / "uptrained", reference, heldout, args.eval_clips)
    print(f"G={args.groups} {args.method}, after {steps} steps ({seconds / 60:.1f} min): {json.dumps(after)}")


if __name__ == "__main__":
    main()
