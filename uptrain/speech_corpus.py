"""Where (audio, transcript) pairs come from: a transcripts file (csv or jsonl) beside its audio files, a folder
holding one, or a dataset (local parquet/json or on the hub) with an audio and a text column.

A transcripts file names each audio file (wav or flac) relative to itself, in `audio_column` (or `file_name`, as
datasets' audiofolder writes it). A folder's audio files must each have a transcript, and every transcript a file.
A dataset's audio column holds datasets' Audio values ({bytes, path}), read here with soundfile (datasets itself
would decode through torchcodec and ffmpeg).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from .audio import AUDIO_SUFFIXES
from .corpora import BUILDERS, CorpusSettings, TextCorpus, _hub_dataset
from .errors import UptrainError, first_line

TRANSCRIPT_SUFFIXES = (".csv", ".jsonl")
FILE_NAME = "file_name"  # datasets' audiofolder column naming each file


@dataclass(frozen=True)
class Clip:
    """One pair: the audio (a path, or a file's bytes) and its transcript; `name` names it in errors."""

    audio: Path | bytes
    text: str
    name: str


@dataclass(frozen=True)
class SpeechCorpus:
    """One split of one speech corpus, as asked for in a recipe."""

    name: str  # a transcripts file, a folder holding one, a local dataset file or a hub id
    split: str
    config: str | None = None
    text_column: str = "text"
    audio_column: str = "audio"
    max_documents: int | None = None
    settings: CorpusSettings = CorpusSettings()


def _transcripts_file(path: Path, src: SpeechCorpus) -> Path:
    if path.is_file():
        return path
    found = sorted(f for f in path.iterdir() if f.suffix in TRANSCRIPT_SUFFIXES and f.is_file())
    if len(found) != 1:
        names = ", ".join(f.name for f in found)
        what = f"{len(found)} transcripts files ({names})" if found else "no transcripts file"
        raise UptrainError(f"{path} holds {what}; put one csv or jsonl file beside the audio, with the columns "
                           f"{src.audio_column!r} (the file) and {src.text_column!r} (its transcript), or point "
                           f"{src.settings.source} at the transcripts file")
    return found[0]


def _transcript_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        raise UptrainError(f"transcripts {path} cannot be read as {path.suffix[1:]}: {first_line(e)}") from None


def _local_clips(path: Path, src: SpeechCorpus) -> list[Clip]:
    transcripts = _transcripts_file(path, src)
    rows = _transcript_rows(transcripts)
    if not rows:
        raise UptrainError(f"transcripts {transcripts} lists no audio; give one row per audio file")
    audio_key = src.audio_column if src.audio_column in rows[0] else FILE_NAME
    for key, setting in ((audio_key, "audio_column"), (src.text_column, "text_column")):
        if key not in rows[0]:
            raise UptrainError(f"transcripts {transcripts} has no column {key!r} (columns: {', '.join(rows[0])}); "
                               f"set data.{setting} to the one holding the {setting.split('_')[0]}")
    root = transcripts.parent
    clips, named = [], set()
    for row in rows:
        file = root / str(row[audio_key] or "")
        text = row.get(src.text_column)
        if not row[audio_key] or not file.is_file():
            raise UptrainError(f"audio {file} (listed in {transcripts}) does not exist; fix the row or add the file")
        if not isinstance(text, str) or not text.strip():
            raise UptrainError(f"audio {file} has no transcript in {transcripts}; give its text or remove its row")
        clips.append(Clip(file, text.strip(), str(file)))
        named.add(file.resolve())
    for file in sorted(f for f in root.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES):
        if file.resolve() not in named:
            raise UptrainError(f"audio {file} has no transcript in {transcripts}; add a row for it or move it out "
                               f"of {root}")
    return clips[: src.max_documents]


def _dataset_clips(ds: datasets.Dataset, src: SpeechCorpus) -> Iterator[Clip]:
    for column, setting in ((src.audio_column, "audio_column"), (src.text_column, "text_column")):
        if column not in ds.column_names:
            raise UptrainError(f"dataset {src.name} has no column {column!r} (columns: {', '.join(ds.column_names)})"
                               f"; set data.{setting} to the one holding the {setting.split('_')[0]}")
    if isinstance(ds.features[src.audio_column], datasets.Audio):
        ds = ds.cast_column(src.audio_column, datasets.Audio(decode=False))  # {bytes, path}: decoded by soundfile
    if src.max_documents is not None:
        ds = ds.select(range(min(src.max_documents, len(ds))))
    for i, row in enumerate(ds):
        audio, text = row[src.audio_column], row[src.text_column]
        audio = audio if isinstance(audio, dict) else {"path": audio, "bytes": None}
        name = f"{src.name} row {i}" + (f" ({audio['path']})" if audio.get("path") else "")
        if not isinstance(text, str) or not text.strip():
            raise UptrainError(f"audio {name} has no transcript; give its text or drop the row")
        if audio.get("bytes"):
            yield Clip(audio["bytes"], text.strip(), name)
        elif audio.get("path"):
            yield Clip(Path(audio["path"]), text.strip(), name)
        else:
            raise UptrainError(f"audio {name} holds neither bytes nor a path; fix data.audio_column")


def speech_clips(src: SpeechCorpus) -> tuple[list[Clip] | Iterator[Clip], str]:
    """The (audio, transcript) pairs of `src` and a fingerprint of them for the feature cache."""
    path = Path(src.name).expanduser()
    if path.exists() and (path.is_dir() or path.suffix in TRANSCRIPT_SUFFIXES):
        clips = _local_clips(path, src)
        stamp = [(str(c.audio), c.audio.stat().st_size, c.audio.stat().st_mtime_ns, c.text) for c in clips]
        return clips, "local:" + hashlib.sha1(json.dumps(stamp).encode()).hexdigest()
    if path.exists():
        builder = BUILDERS.get(path.suffix)
        if builder not in ("json", "parquet"):
            raise UptrainError(f"{path} is neither a transcripts file ({', '.join(TRANSCRIPT_SUFFIXES)}), a folder "
                               f"nor a parquet/json dataset; fix {src.settings.source}")
        try:
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
        except Exception as e:  # malformed json/parquet
            raise UptrainError(f"could not read {path} as {builder}: {first_line(e)}") from None
        stat = path.stat()
        fp = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    elif src.name.startswith(("/", "./", "../", "~")):
        raise UptrainError(f"data path {src.name} does not exist; fix {src.settings.source}")
    else:
        ds = _hub_dataset(TextCorpus(src.name, src.split, src.config, src.text_column, settings=src.settings))
        fp = f"hub:{src.name}:{src.config}:{src.split}"
    return _dataset_clips(ds, src), f"{fp}|{src.audio_column}|{src.text_column}|{src.max_documents}"
