"""Calibration audio for a speech model (whisper): a folder of wav/flac clips becomes, per batch, the model's forward
arguments `input_features` (the feature extractor's log-mel, from the model folder's preprocessor_config.json or
processor_config.json) and `decoder_input_ids` (the prompt as whisper's generate() writes it: start, language, task
and no-timestamps tokens; then the transcript's, as the speech uptraining builds its targets), so that
cross-attention K/V are fitted on the real encoder states and decoder self-attention on the transcripts.

Transcripts come from a csv or jsonl file beside the audio (the format gqa-uptrain's speech data reads: columns
`audio` or `file_name`, and `text`). A folder without one is transcribed by the source itself, and a multilingual
whisper's language is detected per clip by the source unless --calibration-language names it: for either, the whole
model is loaded once and runs each clip (acceptable at whisper's sizes, under 2 B parameters; the block stream that
then calibrates runs block by block as for text).

Clips are batched by transcript length, and shorter transcripts are padded at the end of the batch, with
`decoder_attention_mask` zero there; the decoder is causal, so no real position reads the padding, though the padded
positions' own inputs add to the decoder's moments (hence batches of alike lengths).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from gqa_toolkit.audio import (TRANSCRIPT_SUFFIXES, Clip, ClipColumns, audio_files, decoder_prompt,
                               generation_config, language_id, language_tokens, local_clips, log_mel_features,
                               transcript_ids)
from gqa_toolkit.errors import ToolkitError

from ..errors import ConversionError, first_line
from gqa_toolkit.families.loading import from_pretrained

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# a missing column in a calibration transcripts file: convert has no setting that names the columns
COLUMNS = ClipColumns(source="--calibration", column_fix="name the column holding the {what} {wanted!r}")
TRANSCRIBE_BATCH = 8


def holds_audio(source) -> bool:
    """`source` (the --calibration value) is audio: a wav/flac file's folder or a transcripts file."""
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix in TRANSCRIPT_SUFFIXES
    return path.is_dir() and bool(audio_files(path))


def has_transcripts(path: Path) -> bool:
    return path.is_file() or any(f.suffix in TRANSCRIPT_SUFFIXES and f.is_file() for f in path.iterdir())


def load_feature_extractor(model_dir: Path):
    """The audio feature extractor saved with the model."""
    from transformers import AutoFeatureExtractor

    fix = f"copy the source model's {' or '.join(PROCESSOR_FILES)} into it, or pass --calibration none"
    if not any((model_dir / name).is_file() for name in PROCESSOR_FILES):
        raise ConversionError(f"audio calibration needs the model's feature extractor, and {model_dir} has no "
                              f"{PROCESSOR_FILES[0]}; {fix}")
    try:
        return AutoFeatureExtractor.from_pretrained(model_dir)
    except (ValueError, OSError, TypeError) as e:
        raise ConversionError(f"{model_dir} has no usable audio feature extractor ({first_line(e)}); {fix}") from None


def _language_id(generation, language: str | None, model_dir: Path) -> int | None:
    """The token of --calibration-language, None when the source is to detect each clip's."""
    try:
        return language_id(generation, language, "--calibration-language", model_dir)
    except ToolkitError as e:
        raise ConversionError(str(e)) from None


def check_calibration_language(model_dir: Path, language: str | None) -> None:
    """Refuse, before any work, a --calibration-language the model does not have."""
    _language_id(generation_config(model_dir), language, model_dir)


def _prompt(generation, start_id: int, language: int | None) -> list[int]:
    return [start_id, *decoder_prompt(generation, language)]


def _source_prompts(model_dir: Path, clips: list[Clip], features: torch.Tensor, auto_class: str, tokenizer, device,
                    generation, start_id: int, language: int | None, transcribe: bool, max_tokens: int
                    ) -> tuple[list[list[int]], list[Clip]]:
    """Each clip's decoder prompt and the clips, from the whole source loaded once, for what needs the source: a
    multilingual model's language, detected per clip when not given (as generate() does), and the greedy transcripts
    of clips that have none. Each batch is encoded once and the decoder run again on the tokens so far (transcripts
    are short)."""
    import transformers
    from transformers.modeling_outputs import BaseModelOutput

    detect = language is None and bool(language_tokens(generation))
    if not (detect or transcribe):
        return [_prompt(generation, start_id, language)] * len(clips), clips
    model = from_pretrained(getattr(transformers, auto_class), model_dir, dtype=torch.float32).to(device).eval()
    eos, prompts, texts = model.config.eos_token_id, [], []
    with torch.no_grad():
        for first in range(0, len(clips), TRANSCRIBE_BATCH):
            batch = features[first:first + TRANSCRIBE_BATCH].to(device)  # (B, mel bins, frames)
            encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(batch).last_hidden_state)
            languages = model.detect_language(encoder_outputs=encoded).tolist() if detect \
                else [language] * len(batch)
            rows = [_prompt(generation, start_id, lang) for lang in languages]
            prompts += rows
            if not transcribe:
                continue
            ids = torch.tensor(rows, device=device)  # (B, P): every prompt has the same tokens but the language
            done = torch.zeros(len(batch), dtype=torch.bool, device=device)
            for _ in range(max_tokens - ids.shape[1]):
                logits = model(encoder_outputs=encoded, decoder_input_ids=ids, use_cache=False).logits[:, -1]
                token = logits.argmax(-1).masked_fill(done, eos)  # (B,)
                ids, done = torch.cat([ids, token[:, None]], dim=1), done | (token == eos)
                if bool(done.all()):
                    break
            for row in ids[:, len(rows[0]):].tolist():
                texts.append(tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True))
    del model
    return prompts, [Clip(c.audio, t.strip(), c.name) for c, t in zip(clips, texts)] if transcribe else clips


class AudioCalibration(NamedTuple):
    batches: list[dict[str, torch.Tensor]]  # each batch's forward arguments
    clips: int
    tokens: int  # the decoder's, prompts included
    languages: dict[str, int]  # the prompts' language tokens ("<|en|>") and their clip counts; empty without


def audio_calibration(model_dir: Path, source: str | Path, samples: int, auto_class: str, batch_size: int = 8,
                      device="cpu", language: str | None = None) -> AudioCalibration:
    """The calibration batches of at most `samples` clips of `source`; `language` is a multilingual whisper's
    (--calibration-language), detected per clip by the source when None."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(source).expanduser()
    config = from_pretrained(AutoConfig, model_dir)
    extractor = load_feature_extractor(model_dir)
    try:
        tokenizer = from_pretrained(AutoTokenizer, model_dir)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"audio calibration needs the source's tokenizer, and {model_dir} has none that loads "
                              f"({first_line(exc)}); add its tokenizer files, or pass --calibration none") from None
    transcribed = not has_transcripts(path)
    clips = (local_clips(path, COLUMNS) if not transcribed
             else [Clip(f, "", str(f)) for f in audio_files(path)])[:samples]
    try:
        features = torch.from_numpy(log_mel_features(clips, extractor, "calibration audio"))  # (clips, mel, frames)
    except ToolkitError as e:
        raise ConversionError(str(e)) from None
    limit = config.max_target_positions
    generation = generation_config(model_dir)
    prompts, clips = _source_prompts(model_dir, clips, features, auto_class, tokenizer, device, generation,
                                     config.decoder_start_token_id, _language_id(generation, language, model_dir),
                                     transcribed, limit)
    ids = [(p + i)[:limit] for p, i in zip(prompts, transcript_ids(tokenizer, [c.text for c in clips]))]
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    # clips of alike transcript lengths share a batch: padding would otherwise be most of the decoder's positions,
    # and padded positions weigh in the fit's moments and refinement's error as much as real ones
    order = sorted(range(len(clips)), key=lambda i: len(ids[i]))
    batches = []
    for first in range(0, len(clips), batch_size):
        chosen = order[first:first + batch_size]
        rows = [ids[i] for i in chosen]
        width = max(map(len, rows))
        decoder = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
        batch = {"input_features": features[chosen], "decoder_input_ids": decoder}
        if any(len(r) < width for r in rows):
            batch["decoder_attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batches.append(batch)
    random.Random(0).shuffle(batches)  # refinement holds out the last batch: not always the longest transcripts
    names = {i: token for token, i in language_tokens(generation).items()}
    return AudioCalibration(batches, len(clips), sum(map(len, ids)),
                            dict(Counter(names[p[1]] for p in prompts if len(p) > 1 and p[1] in names)))
