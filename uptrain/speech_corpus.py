"""Where (audio, transcript) pairs come from: a transcripts file (csv or jsonl) beside its audio files, a folder
holding one, or a dataset (local parquet/json or on the hub) with an audio and a text column.

A transcripts file names each audio file (wav or flac) relative to itself, in `audio_column` (or `file_name`, as
datasets' audiofolder writes it). A folder's audio files must each have a transcript, and every transcript a file.
A dataset's audio column holds datasets' Audio values ({bytes, path}), read here with soundfile (datasets itself
would decode through torchcodec and ffmpeg).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from gqa_toolkit.audio import FILE_NAME, TRANSCRIPT_SUFFIXES, Clip, ClipColumns, local_clips  # noqa: F401

from .corpora import BUILDERS, CorpusSettings, TextCorpus, _hub_dataset
from .errors import UptrainError, first_line, uptrain_errors


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


def _local_clips(path: Path, src: SpeechCorpus) -> list[Clip]:
    """A transcripts file beside its audio (read by the kernel's reader, shared with conversion's calibration)."""
    with uptrain_errors():
        return local_clips(path, ClipColumns(src.audio_column, src.text_column, src.settings.source),
                           src.max_documents)


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
