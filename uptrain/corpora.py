"""Where text comes from: the built-in python-stdlib corpus, local files (text, json/jsonl, parquet) or a hub dataset.

Every loader returns a datasets `Dataset` (or `IterableDataset` when streaming) with only the text column (and the
target column of pairs), plus a fingerprint string that identifies the text for the block cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
from huggingface_hub.utils import get_session

from gqa_toolkit import corpus
from gqa_toolkit.model_dir import cache_fault

from .errors import UptrainError, first_line

# file suffix -> datasets builder; plain text files are read one document per file
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text",
            ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class CorpusSettings:
    """What the user set each part of a corpus (and the task cut from it) with, for messages that name the fix:
    recipe keys for uptrain and the ablation, command-line options for gqa-eval (None: not a setting there)."""

    source: str = "data.source (or data.eval_source)"
    split: str = "data.split"
    config: str = "data.config"
    text_column: str = "data.text_column"
    target_column: str = "data.target_column"
    block_size: str = "data.block_size"
    noise_density: str | None = "objective.noise_density"


@dataclass(frozen=True)
class TextCorpus:
    """One split of one corpus, as asked for in a recipe."""

    name: str  # 'python-stdlib', a local path or a hub id
    split: str
    config: str | None = None
    text_column: str = "text"
    max_documents: int | None = None
    streaming: bool = False
    target_column: str | None = None  # kept beside the text for (input, target) pairs
    settings: CorpusSettings = CorpusSettings()

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.text_column,) if self.target_column is None else (self.text_column, self.target_column)


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in BUILDERS and f.is_file())
    if not files:
        raise UptrainError(f"{path} holds no data files; expected {', '.join(sorted(BUILDERS))} files")
    builders = {BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        raise UptrainError(f"{path}: unsupported file type; expected one of {', '.join(sorted(BUILDERS))}")
    if len(builders) > 1:
        raise UptrainError(f"{path} mixes file types ({', '.join(sorted(builders))}); keep one type per folder")
    return files


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in BUILDERS


def _not_found(src: TextCorpus, where: str, also: str = "") -> UptrainError:
    return UptrainError(
        f"could not load hub dataset {src.name!r} (config {src.config!r}, split {src.split!r}): it is neither a local "
        f"path nor {where}; fix {src.settings.source}: the built-in corpus is {corpus.NAME!r}, or give a "
        f"local file or folder{also}"
    )


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached now, or None. One request without retries: with no network, datasets would
    retry for half a minute before saying anything."""
    try:
        get_session().head(datasets.config.HF_ENDPOINT, timeout=5)
    except Exception as e:  # whichever HTTP library this huggingface_hub release uses
        return first_line(e)
    return None


def _hub_dataset(src: TextCorpus) -> datasets.Dataset | datasets.IterableDataset:
    offline = datasets.config.HF_HUB_OFFLINE
    if not offline and (why := _hub_unreachable()):
        raise _not_found(src, f"reachable on the hub ({datasets.config.HF_ENDPOINT}: {why})",
                         " (or set HF_HUB_OFFLINE=1 to use a hub dataset that is already cached)")
    try:
        return datasets.load_dataset(src.name, src.config, split=src.split, streaming=src.streaming)
    except (FileNotFoundError, ConnectionError):  # no such dataset, or offline and not in the cache
        raise _not_found(src, "a hub dataset in the local cache (HF_HUB_OFFLINE is set)" if offline
                         else "a dataset on the hub") from None
    except Exception as e:  # gated, no such config or split, ...: datasets raises many types here
        raise UptrainError(f"could not load hub dataset {src.name!r} (config {src.config!r}, split {src.split!r}): "
                           f"{first_line(e)}; check {src.settings.config} and {src.settings.split}, or point "
                           f"{src.settings.source} at local files"
                           ) from None


def _read_problem(error: BaseException, builder: str) -> str:
    """The cause under datasets' generic "An error occurred while generating the dataset", with the fix."""
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, UnicodeDecodeError):
            return f"it is not UTF-8 text (byte {e.start}); save it as UTF-8"
    root = chain[-1]
    fix = {"json": "write one JSON object per line, or a list of objects, each with the text column",
           "csv": "write a header row naming the columns"}.get(builder, "check the file")
    return f"{first_line(root)}; {fix}"


def load_text(src: TextCorpus) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    """The texts of `src` and a fingerprint of them; raises UptrainError for a missing path or text column."""
    if src.name == corpus.NAME:
        if src.split not in ("train", "heldout"):
            raise UptrainError(f"python-stdlib has splits 'train' and 'heldout', not {src.split!r}; fix {src.settings.split}")
        kwargs = {"split": src.split, "limit": src.max_documents}
        if src.streaming:
            ds = datasets.IterableDataset.from_generator(corpus.iter_texts, gen_kwargs=kwargs)
        else:
            ds = datasets.Dataset.from_list(list(corpus.iter_texts(**kwargs)))
        fp = "stdlib:" + corpus.fingerprint(src.split, src.max_documents)
    elif (path := Path(src.name).expanduser()).exists():
        files = _local_files(path)
        builder = BUILDERS[files[0].suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       streaming=src.streaming, **kwargs)
        except Exception as e:  # malformed json/parquet
            cache = cache_fault(e)
            if cache and not any(str(f) in cache for f in files):
                raise UptrainError(f"reading {path}: {cache}") from None
            raise UptrainError(f"could not read {path} as {builder}: {_read_problem(e, builder)}") from None
        stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        fp = "local:" + hashlib.sha1(json.dumps(stamp).encode()).hexdigest()
    elif _looks_local(src.name):
        raise UptrainError(f"data path {src.name} does not exist; fix {src.settings.source}")
    else:
        ds = _hub_dataset(src)
        fp = f"hub:{src.name}:{src.config}:{src.split}"

    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds), {}).keys())
    if not columns:
        raise UptrainError(f"dataset {src.name} (split {src.split}) is empty; point {src.settings.source} at some text")
    for role, column in zip(("text", "target"), src.columns):
        if column not in columns:
            raise UptrainError(
                f"dataset {src.name} has no {role} column {column!r} (columns: {', '.join(columns)}); "
                f"set {getattr(src.settings, f'{role}_column')} to the one holding the {role}s"
            )
    for role, column in zip(("text", "target"), src.columns):
        feature = (ds.features or {}).get(column)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            kind = getattr(feature, "dtype", None) or type(feature).__name__
            raise UptrainError(f"dataset {src.name}'s {role} column {column!r} holds {kind} values, not text; set "
                               f"{getattr(src.settings, f'{role}_column')} to a column of strings")
    if isinstance(ds, datasets.Dataset):
        ds = ds.remove_columns([c for c in columns if c not in src.columns])
    else:
        ds = ds.select_columns(list(src.columns))
    if src.max_documents is not None:
        ds = ds.take(src.max_documents) if src.streaming else ds.select(range(min(src.max_documents, len(ds))))
    return ds, f"{fp}|{'|'.join(src.columns)}|{src.max_documents}"
