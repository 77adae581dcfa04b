"""`python -m gqa_toolkit.uptrain.tones OUT_DIR`: synthetic speech to try the speech path on with no download.

Each word of a small vocabulary is a tone of its own pitch (near the centre of one band of the tiny whisper's mel
filters); a sentence is two to five words in a row with short pauses. OUT_DIR gets one wav file per sentence and
transcripts.csv (columns `audio`, `text`), the layout gqa-uptrain and gqa-eval read as data.source / --data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import click
import numpy as np

from gqa_toolkit.command import HELP, Command, user_errors

WORDS = {"red": 340.0, "green": 680.0, "blue": 1010.0, "gold": 1420.0, "gray": 2020.0, "pink": 2830.0,
         "teal": 4020.0, "navy": 5660.0}  # word -> pitch in Hz
WORD_SECONDS, PAUSE_SECONDS = 0.1, 0.04
RATE = 22_050  # Hz, as espeak-ng writes: the tiny whisper's feature extractor resamples it to 16 kHz


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = list(WORDS)
    return [" ".join(rng.choice(names, size=rng.integers(2, 6))) for _ in range(count)]


def sentence_audio(text: str, rate: int = RATE) -> np.ndarray:
    """The tones of `text`'s words, each faded in and out, with pauses between (n,) float32."""
    t = np.arange(int(WORD_SECONDS * rate)) / rate
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms ramps: no clicks across the bands
    pause = np.zeros(int(PAUSE_SECONDS * rate))
    parts = [pause]
    for word in text.split():
        parts += [0.5 * fade * np.sin(2 * np.pi * WORDS[word] * t), pause]
    return np.concatenate(parts).astype(np.float32)


def write_tone_corpus(out: str | Path, count: int = 64, seed: int = 0, rate: int = RATE) -> Path:
    """`count` sentences as wav files plus transcripts.csv in `out`; returns the transcripts file."""
    import soundfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(sentences(count, seed)):
        name = f"clip-{i:04d}.wav"
        soundfile.write(out / name, sentence_audio(text, rate), rate)
        rows.append({"audio": name, "text": text})
    path = out / "transcripts.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@click.command(cls=Command, context_settings=HELP)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--count", default=64, show_default=True, help="Sentences to write.")
@click.option("--seed", default=0, show_default=True)
@user_errors("python -m gqa_toolkit.uptrain.tones", "remove OUT and run it again")
def main(out: str, count: int, seed: int) -> None:
    """Write COUNT synthetic tone sentences and their transcripts into OUT."""
    click.echo(f"{count} clips and their transcripts written to {write_tone_corpus(out, count, seed)}")


if __name__ == "__main__":
    main()
