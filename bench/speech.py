"""Synthetic English speech for the real-checkpoint benchmark: 40 sentences of our own, spoken by espeak-ng
(`apt-get install espeak-ng`), resampled to 16 kHz mono wav, and a word error rate.

    .venv/bin/python bench/speech.py [--output ../shared-models/speech]

Writes NN.wav and sentences.txt (one sentence a line, line N for N.wav). Sentences avoid digits and
abbreviations, so that scoring needs no number or spelling normalisation beyond case and punctuation.
Voices alternate between American and British English at two speaking rates.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import wave
from pathlib import Path

import numpy as np

RATE = 16_000
DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "shared-models" / "speech"
VOICES = (("en-us", 160), ("en-gb", 150), ("en-us", 140), ("en-gb", 170))
SENTENCES = (
    "The train to the coast leaves every morning before the sun comes up.",
    "She planted tomatoes and beans along the south wall of the garden.",
    "Please close the window when you leave the room.",
    "The library will be closed on Monday for cleaning.",
    "My brother learned to swim when he was very young.",
    "A small dog ran across the road and disappeared into the park.",
    "We need more flour, some butter and a dozen eggs for the cake.",
    "The meeting has been moved to the large room on the second floor.",
    "It rained all night, and the river rose above its banks.",
    "He forgot his umbrella on the bus again.",
    "The museum has a new exhibition about the history of flight.",
    "Could you tell me where the nearest post office is?",
    "The children built a castle of sand near the water.",
    "Our neighbours painted their front door a bright shade of blue.",
    "The doctor said that I should drink more water and sleep longer.",
    "Fresh bread smells wonderful early in the morning.",
    "The old bridge was replaced by a wider one made of steel.",
    "They walked along the beach and talked about their plans for the summer.",
    "This recipe needs two cups of rice and a little salt.",
    "The team practised for weeks before the final game.",
    "A cold wind was blowing from the north all afternoon.",
    "I have never seen so many stars in the sky.",
    "The farmer drove his tractor slowly across the wet field.",
    "Remember to water the plants while we are away.",
    "The concert started late because the singer was stuck in traffic.",
    "She writes a letter to her grandmother every week.",
    "The price of coffee has gone up again this year.",
    "We watched the birds gather on the roof before they flew south.",
    "The teacher asked the students to read the first chapter at home.",
    "His new bicycle is faster than the old one.",
    "The shop on the corner sells newspapers, sweets and flowers.",
    "After dinner we played cards until midnight.",
    "The mountain road was closed because of heavy snow.",
    "Please turn off the lights before you go to bed.",
    "The cat sleeps in the sun by the kitchen window.",
    "Nobody knew the answer to the last question.",
    "The ship sailed out of the harbour in the early evening.",
    "He keeps his tools in a wooden box in the garage.",
    "The village holds a market in the square every Saturday.",
    "Thank you for helping me carry these heavy boxes.",
)


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling through the FFT (clips are a few seconds long)."""
    n = round(len(samples) * new_rate / rate)
    spectrum = np.fft.rfft(samples)[: n // 2 + 1]
    return np.fft.irfft(spectrum, n) * (n / len(samples))


def read_wav(path_or_bytes) -> tuple[np.ndarray, int]:
    """Mono 16-bit PCM wav -> float32 samples in [-1, 1] and the sample rate."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with wave.open(source) as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path_or_bytes}: expected mono 16-bit PCM")
        frames = w.readframes(w.getnframes())
        return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768, w.getframerate()


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def synthesise(text: str, voice: str, speed: int) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True,
                         capture_output=True).stdout
    samples, rate = read_wav(wav)
    return resample(samples, rate, RATE).astype(np.float32)


def load_speech(folder: Path) -> tuple[list[np.ndarray], list[str]]:
    """The clips (float32 at 16 kHz) and their sentences, in file order."""
    sentences = (folder / "sentences.txt").read_text(encoding="utf-8").splitlines()
    clips = []
    for i in range(len(sentences)):
        samples, rate = read_wav(str(folder / f"{i:02d}.wav"))
        if rate != RATE:
            raise ValueError(f"{folder / f'{i:02d}.wav'} is at {rate} Hz, not {RATE}")
        clips.append(samples)
    return clips, sentences


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split()


def word_errors(hypothesis: str, reference: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) after lower-casing and dropping punctuation."""
    hyp, ref = words(hypothesis), words(reference)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1], len(ref)


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus word error rate: all errors over all reference words."""
    errors, total = map(sum, zip(*(word_errors(h, r) for h, r in zip(hypotheses, references, strict=True))))
    return errors / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    for i, text in enumerate(SENTENCES):
        voice, speed = VOICES[i % len(VOICES)]
        samples = synthesise(text, voice, speed)
        write_wav(args.output / f"{i:02d}.wav", samples, RATE)
        seconds += len(samples) / RATE
    (args.output / "sentences.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    print(f"wrote {len(SENTENCES)} clips ({seconds:.0f} s of speech at {RATE} Hz) to {args.output}")


if __name__ == "__main__":
    main()
