"""Speech as an uptraining task: (audio, transcript) pairs become rows of log-mel features (the feature extractor's,
computed once and cached like text blocks) and transcript tokens; the decoder predicts the transcript.

A row's labels are the decoder's prompt after its start token (as whisper's generate() writes it: the language, task
and no-timestamps tokens that the generation config has), the transcript's tokens and eos, padded with IGNORE to
`target_length`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from gqa_toolkit.audio import (decoder_prompt, generation_config, language_id, language_tokens,
                               log_mel_features, transcript_ids)
from gqa_toolkit.errors import first_line
from gqa_toolkit.families.spec import audio_input

from .errors import UptrainError, uptrain_errors
from .speech_corpus import Clip
from .tasks import IGNORE, shift_right

FEATURES_BATCH = 32  # clips whose features are computed together
# the feature extractor alone, or inside a whole processor's file (WhisperProcessor.save_pretrained in transformers 5)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def load_feature_extractor(model_dir: Path):
    """The audio feature extractor saved with the model (preprocessor_config.json)."""
    from transformers import AutoFeatureExtractor

    if not any((model_dir / name).is_file() for name in PROCESSOR_FILES):
        raise UptrainError(f"{model_dir} has no {PROCESSOR_FILES[0]} (the audio feature extractor that turns speech "
                           f"into its input features); copy the source model's {' or '.join(PROCESSOR_FILES)} "
                           "into it")
    try:
        return AutoFeatureExtractor.from_pretrained(model_dir)
    except (ValueError, OSError, TypeError) as e:
        raise UptrainError(f"{model_dir} has no usable audio feature extractor ({first_line(e)}); copy the source "
                           f"model's {' or '.join(PROCESSOR_FILES)} into it") from None


@dataclass(frozen=True)
class SpeechTranscripts:
    """One (log-mel features, transcript tokens) pair per row."""

    row_length: int  # encoder positions of the audio window
    target_length: int  # decoder tokens: prompt, transcript, eos, padding
    prompt: tuple[int, ...]
    eos_id: int
    pad_id: int
    decoder_start_id: int
    feature_extractor: object = field(compare=False, repr=False)
    name: str = "speech"

    @property
    def format_key(self) -> str:
        extractor = self.feature_extractor.to_json_string()
        # v2: transcripts after a space, a cut transcript without eos (rows cached by v1 are rebuilt)
        return f"speech-v2|{self.target_length}|{self.prompt}|{extractor}"

    def labels(self, ids: list[int]) -> list[int]:
        """The prompt, the transcript and eos, padded with IGNORE; a transcript too long is cut without eos, so that
        no row teaches the decoder to stop in mid-speech."""
        ids = [*self.prompt, *ids, self.eos_id][: self.target_length]
        return ids + [IGNORE] * (self.target_length - len(ids))

    def features(self, clips: list[Clip]) -> np.ndarray:
        """Log-mel features (n, mel bins, frames) of the clips, each refused in one line when unusable."""
        with uptrain_errors():
            return log_mel_features(clips, self.feature_extractor,
                                    fix="cut it into shorter clips with their transcripts")

    def rows(self, clips, tokenizer) -> datasets.Dataset:
        columns: dict[str, list] = {"input_features": [], "labels": []}
        batch: list[Clip] = []

        def flush():
            columns["input_features"].extend(self.features(batch))
            ids = transcript_ids(tokenizer, [c.text for c in batch])
            columns["labels"].extend(self.labels(i) for i in ids)
            batch.clear()

        for clip in clips:
            batch.append(clip)
            if len(batch) == FEATURES_BATCH:
                flush()
        if batch:
            flush()
        if not columns["labels"]:
            return datasets.Dataset.from_dict({"labels": []})
        shape = columns["input_features"][0].shape  # (mel bins, frames)
        features = datasets.Features({"input_features": datasets.Array2D(shape, "float32"),
                                      "labels": datasets.Sequence(datasets.Value("int32"))})
        return datasets.Dataset.from_dict(columns, features=features)

    def examples(self, rows: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        return {**rows, "decoder_input_ids": shift_right(rows["labels"], self.decoder_start_id, self.pad_id)}


def speech_task(config, tokenizer, target_length: int, language: str | None) -> SpeechTranscripts:
    """The speech task for an audio model whose config was read from its directory (the feature extractor lies
    beside it)."""
    audio = audio_input(config.model_type)
    fe = load_feature_extractor(Path(config.name_or_path))
    positions = getattr(config, audio.positions_attr)
    frames = positions * audio.frames_per_position
    if getattr(fe, "nb_max_frames", frames) != frames or getattr(fe, "feature_size", None) != \
            getattr(config, audio.mel_bins_attr):
        raise UptrainError(f"the feature extractor in {config.name_or_path} makes {fe.feature_size} mel bins x "
                           f"{fe.nb_max_frames} frames but the model's encoder takes "
                           f"{getattr(config, audio.mel_bins_attr)} x {frames}; use the source model's "
                           "preprocessor_config.json")
    target_length = min(target_length, getattr(config, audio.decoder_positions_attr))  # the decoder's positions
    pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.eos_token_id
    start_id = config.decoder_start_token_id
    generation = generation_config(config.name_or_path)
    if language is None and language_tokens(generation):
        # whisper writes the language token after its start token; a prompt without it puts every transcript token
        # one position early, which cost a converted whisper-base most of its words (docs/speech-uptrain.md)
        raise UptrainError(f"{config.name_or_path} is a multilingual whisper: its decoder prompt opens with the clips' "
                           "language; name it (gqa-uptrain: data.language, gqa-eval: --language), e.g. en")
    with uptrain_errors():
        prompt = decoder_prompt(generation, language_id(generation, language, "data.language", config.name_or_path))
    return SpeechTranscripts(positions, target_length, tuple(prompt),
                             tokenizer.eos_token_id, pad_id, start_id, fe)
