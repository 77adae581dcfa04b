"""Audio for speech models: decode a wav/flac file (or its bytes) to mono float32 and resample it to the feature
extractor's rate, and read a folder of clips with their transcripts file. Every refusal is one line naming the
file, raised as the toolkit's base error so that conversion (audio calibration) and uptraining both read audio here.

Decoding goes through soundfile (libsndfile ships in its wheel: no ffmpeg). Resampling is band-limited
interpolation with a Hann-windowed sinc: each output sample is a weighted sum of the input samples within `ZEROS`
zero crossings of the kernel, whose cutoff is the lower of the two Nyquist frequencies (so downsampling filters out
what the new rate cannot hold).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ToolkitError, first_line

AUDIO_SUFFIXES = (".wav", ".flac")
TRANSCRIPT_SUFFIXES = (".csv", ".jsonl")
FILE_NAME = "file_name"  # datasets' audiofolder column naming each file
MIN_RATE = 1_000  # Hz: below this a file holds no speech band to resample from
ZEROS = 16  # zero crossings of the sinc kernel on each side: the filter's length, and its sharpness
ROLLOFF = 0.945  # the cutoff as a fraction of the lower Nyquist frequency, so the window's transition band fits
CHUNK = 16_384  # output samples computed at once: memory of CHUNK x kernel taps
POLYPHASE_TAPS = 4_000_000  # the largest polyphase filter bank (phases x taps) built for a rational ratio


def read_audio(source: str | Path | bytes, name: str) -> tuple[np.ndarray, int]:
    """The samples (n,) as mono float32 in [-1, 1] and their rate; `name` names the file in errors."""
    import soundfile

    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                    dtype="float32", always_2d=True)  # (n, channels)
    except (RuntimeError, OSError, ValueError, TypeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolkitError(f"audio {name} cannot be read ({why}); give a wav or flac file") from None
    if len(data) == 0:
        raise ToolkitError(f"audio {name} is empty (no samples); remove it or its transcript")
    return data.mean(axis=1), int(rate)


def resample(samples: np.ndarray, rate: int, new_rate: int, name: str = "audio") -> np.ndarray:
    """`samples` (n,) at `rate` Hz as float32 samples (round(n * new_rate / rate),) at `new_rate` Hz."""
    if rate < MIN_RATE:
        raise ToolkitError(f"audio {name} is sampled at {rate} Hz, too low to resample to {new_rate} Hz for speech; "
                           f"give audio recorded at {MIN_RATE} Hz or more")
    if rate == new_rate:
        return samples.astype(np.float32, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float64))  # (n,)
    n_out = round(len(x) * new_rate / rate)
    if n_out == 0:
        raise ToolkitError(f"audio {name} is shorter than one sample at {new_rate} Hz; remove it or its transcript")
    cutoff = ROLLOFF * min(1.0, new_rate / rate)  # in cycles per input sample x 2 (1.0 = the input's Nyquist)
    half = math.ceil(ZEROS / cutoff)  # input samples on each side of an output sample
    g = math.gcd(rate, new_rate)
    up, down = new_rate // g, rate // g  # output j sits at input position j * down / up
    if up * (2 * half + down + 1) <= POLYPHASE_TAPS:
        y = _polyphase(x, up, down, half, cutoff)
    else:
        y = _direct(x, n_out, rate / new_rate, half, cutoff)
    return y[:n_out].to(torch.float32).numpy()


def _kernel(distance: torch.Tensor, half: int, cutoff: float) -> torch.Tensor:
    """The Hann-windowed sinc at `distance` input samples (zero beyond `half`)."""
    window = torch.where(distance.abs() <= half, 0.5 + 0.5 * torch.cos(math.pi * distance / (half + 1)), 0.0)
    return cutoff * torch.sinc(cutoff * distance) * window


def _polyphase(x: torch.Tensor, up: int, down: int, half: int, cutoff: float) -> torch.Tensor:
    """A rational ratio as one strided convolution: output j = q * up + p is channel p's output q."""
    taps = 2 * half + down + 1
    phase = torch.arange(up, dtype=torch.float64) * down / up  # (up,) offset of phase p within a period
    distance = phase[:, None] + half - torch.arange(taps, dtype=torch.float64)  # (up, taps)
    weight = _kernel(distance, half, cutoff)[:, None, :]  # (up, 1, taps)
    padded = torch.nn.functional.pad(x, (half, taps))[None, None, :]  # (1, 1, n + pads)
    y = torch.nn.functional.conv1d(padded, weight, stride=down)  # (1, up, periods)
    return y[0].T.reshape(-1)  # (periods * up,) in output order


def _direct(x: torch.Tensor, n_out: int, step: float, half: int, cutoff: float) -> torch.Tensor:
    """Any ratio, output sample by output sample (chunked): for rates with few common factors."""
    taps = torch.arange(-half, half + 1, dtype=torch.float64)  # (K,)
    padded = torch.nn.functional.pad(x, (half + 1, half + 1))
    out = []
    for start in range(0, n_out, CHUNK):
        t = torch.arange(start, min(start + CHUNK, n_out), dtype=torch.float64) * step  # input positions (c,)
        offsets = torch.floor(t)[:, None] + taps  # (c, K) input sample indices
        kernel = _kernel(t[:, None] - offsets, half, cutoff)  # (c, K)
        out.append((padded[(offsets + half + 1).long()] * kernel).sum(dim=1))  # (c,)
    return torch.cat(out)


def load_audio(source: str | Path | bytes, rate: int, name: str) -> np.ndarray:
    """A file's (or its bytes') samples at `rate` Hz, mono float32 (n,)."""
    samples, file_rate = read_audio(source, name)
    return resample(samples, file_rate, rate, name)


def transcript_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of transcripts as a speech decoder writes them, after a space: whisper's transcripts begin " The",
    and the first word tokenized without its space is one the model never wrote (whisper-base: about 9 nats on
    that token against 0.7)."""
    return tokenizer([" " + text.strip() for text in texts], add_special_tokens=False)["input_ids"]


def generation_config(model_dir: str | Path):
    """The model's generation config (whisper's prompt tokens), or None without one."""
    from transformers import GenerationConfig

    from .families.loading import from_pretrained

    try:
        return from_pretrained(GenerationConfig, model_dir)
    except (OSError, ValueError):
        return None


def language_tokens(generation) -> dict[str, int]:
    """A multilingual whisper's language tokens ("<|en|>" -> id) in its generation config; empty for an English-only
    model or none (None)."""
    return dict(getattr(generation, "lang_to_id", None) or {})


def language_id(generation, language: str | None, option: str, model_dir: str | Path) -> int | None:
    """The token of `language` ("en" or "<|en|>"; None: none given) in `model_dir`'s generation config, refused in
    one line naming `option` (the setting that gave it) when the model has no such language."""
    if language is None:
        return None
    languages = language_tokens(generation)
    if not languages:
        raise ToolkitError(f"{option} {language} picks a multilingual whisper's language token, and {model_dir} "
                           f"names no languages in its generation_config.json; drop {option}")
    token = language if language.startswith("<|") else f"<|{language.lower()}|>"
    if token not in languages:
        codes = ", ".join(t.strip("<|>") for t in list(languages)[:8])
        raise ToolkitError(f"{option} {language} is not one of {model_dir}'s {len(languages)} languages; give a "
                           f"code such as {codes}")
    return languages[token]


def decoder_prompt(generation, language: int | None) -> list[int]:
    """The decoder's tokens after its start token, as whisper's generate() writes them: the language token `language`
    (multilingual models), <|transcribe|> and <|notimestamps|> where the generation config has them; none without
    a generation config."""
    if generation is None:
        return []
    tasks = getattr(generation, "task_to_id", None) or {}
    no_timestamps = getattr(generation, "no_timestamps_token_id", None)
    return [*([language] if language is not None else []), *([tasks["transcribe"]] if "transcribe" in tasks else []),
            *([no_timestamps] if no_timestamps is not None else [])]


def log_mel_features(clips, extractor, what: str = "audio", fix: str = "cut it into shorter clips") -> np.ndarray:
    """The feature extractor's log-mel features `(clips, mel bins, frames)` of clips decoded at its rate, a clip
    longer than its window refused in one line naming the file (`what` names the clip's role, `fix` the remedy)."""
    rate, audio = extractor.sampling_rate, []
    for clip in clips:
        samples = load_audio(clip.audio, rate, clip.name)
        if len(samples) > extractor.n_samples:
            raise ToolkitError(f"{what} {clip.name} lasts {len(samples) / rate:.1f} s, longer than the model's "
                               f"{extractor.n_samples / rate:g} s window; {fix}")
        audio.append(samples)
    return extractor(audio, sampling_rate=rate, return_tensors="np")["input_features"].astype(np.float32)


@dataclass(frozen=True)
class Clip:
    """One pair: the audio (a path, or a file's bytes) and its transcript; `name` names it in errors."""

    audio: Path | bytes
    text: str
    name: str


@dataclass(frozen=True)
class ClipColumns:
    """How a transcripts file is read and how errors name the settings that fix it: the columns naming each audio
    file (or `file_name`, as datasets' audiofolder writes it) and holding its transcript; `source` names the
    setting that points at the clips, and `column_fix` says how to fix a missing column (formatted with `setting`,
    the column's setting, `what`, audio or text, and `wanted`, the column looked for)."""

    audio: str = "audio"
    text: str = "text"
    source: str = "data.source"
    column_fix: str = "set data.{setting} to the one holding the {what}"


def transcripts_file(path: Path, columns: ClipColumns = ClipColumns()) -> Path:
    """`path` itself when a file, else the one transcripts file (csv or jsonl) in the folder."""
    if path.is_file():
        return path
    found = sorted(f for f in path.iterdir() if f.suffix in TRANSCRIPT_SUFFIXES and f.is_file())
    if len(found) != 1:
        names = ", ".join(f.name for f in found)
        what = f"{len(found)} transcripts files ({names})" if found else "no transcripts file"
        raise ToolkitError(f"{path} holds {what}; put one csv or jsonl file beside the audio, with the columns "
                           f"{columns.audio!r} (the file) and {columns.text!r} (its transcript), or point "
                           f"{columns.source} at the transcripts file")
    return found[0]


def _transcript_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        raise ToolkitError(f"transcripts {path} cannot be read as {path.suffix[1:]}: {first_line(e)}") from None


def local_clips(path: Path, columns: ClipColumns = ClipColumns(), max_documents: int | None = None) -> list[Clip]:
    """The (audio file, transcript) pairs of a transcripts file, or of a folder holding one beside its audio: every
    listed file must exist and have a transcript, and every audio file under the folder must be listed."""
    transcripts = transcripts_file(path, columns)
    rows = _transcript_rows(transcripts)
    if not rows:
        raise ToolkitError(f"transcripts {transcripts} lists no audio; give one row per audio file")
    audio_key = columns.audio if columns.audio in rows[0] else FILE_NAME
    for key, setting in ((audio_key, "audio_column"), (columns.text, "text_column")):
        if key not in rows[0]:
            fix = columns.column_fix.format(setting=setting, what=setting.split("_")[0], wanted=key)
            raise ToolkitError(f"transcripts {transcripts} has no column {key!r} (columns: {', '.join(rows[0])}); "
                               f"{fix}")
    root = transcripts.parent
    clips, named = [], set()
    for row in rows:
        file = root / str(row[audio_key] or "")
        text = row.get(columns.text)
        if not row[audio_key] or not file.is_file():
            raise ToolkitError(f"audio {file} (listed in {transcripts}) does not exist; fix the row or add the file")
        if not isinstance(text, str) or not text.strip():
            raise ToolkitError(f"audio {file} has no transcript in {transcripts}; give its text or remove its row")
        clips.append(Clip(file, text.strip(), str(file)))
        named.add(file.resolve())
    for file in audio_files(root):
        if file.resolve() not in named:
            raise ToolkitError(f"audio {file} has no transcript in {transcripts}; add a row for it or move it out "
                               f"of {root}")
    return clips[:max_documents]


def audio_files(folder: Path) -> list[Path]:
    """The wav/flac files under `folder`, in name order."""
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
