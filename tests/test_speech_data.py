"""The speech inputs on their own: the resampler against the analytic signal, the word error rate against hand-
counted edits, and every kind of bad audio refused in one line naming the file, before anything is written."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile

from gqa_toolkit.eval.wer import edit_distance, normalise, word_error_rate
from gqa_toolkit.uptrain import UptrainError, train, validate_recipe
from gqa_toolkit.uptrain.audio import read_audio, resample
from gqa_toolkit.uptrain.tiny import build_tiny_whisper
from gqa_toolkit.uptrain.tones import sentence_audio, write_tone_corpus
from conftest import WHISPER_LANGUAGES, WHISPER_NO_TIMESTAMPS, WHISPER_TRANSCRIBE, make_multilingual


@pytest.mark.parametrize("rate, new_rate, hz", [(22_050, 16_000, 440.0), (8_000, 16_000, 1_000.0),
                                                (44_100, 16_000, 3_000.0), (44_099, 16_000, 2_000.0),
                                                (16_000, 8_000, 3_000.0)])
def test_resampled_sine_is_the_sine_at_the_new_rate(rate, new_rate, hz):
    """Both paths (one strided convolution for rates with common factors, sample by sample for 44,099 Hz)."""
    seconds = 0.5
    x = np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate).astype(np.float32)
    y = resample(x, rate, new_rate)
    assert y.dtype == np.float32 and len(y) == round(len(x) * new_rate / rate)
    expected = np.sin(2 * np.pi * hz * np.arange(len(y)) / new_rate)
    inner = slice(100, -100)  # the edges see the zero padding
    assert np.abs(y[inner] - expected[inner]).max() < 2e-3


def test_downsampling_removes_what_the_new_rate_cannot_hold():
    rate = 16_000
    x = np.sin(2 * np.pi * 6_000 * np.arange(rate) / rate).astype(np.float32)  # above 8 kHz's Nyquist (4 kHz)
    assert np.abs(resample(x, rate, 8_000)[100:-100]).max() < 0.01


def test_word_error_rate_counts_edits_on_normalised_words():
    assert normalise("Hello, World!  It's  fine.") == ["hello", "world", "it's", "fine"]
    assert edit_distance("a b c d".split(), "a x c".split()) == 2  # one substitution, one deletion
    assert edit_distance([], ["a", "b"]) == 2
    # 1 substitution + 1 insertion over 3 + 2 reference words
    assert word_error_rate(["the cat sat", "Hi there"], ["the dog sat", "hi there you"]) == pytest.approx(2 / 5)
    assert word_error_rate(["same words"], ["Same words."]) == 0.0


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("speech") / "whisper")


def _write_clips(folder, rows, audio=None):
    folder.mkdir(exist_ok=True)
    for name, _ in rows:
        if not (folder / name).exists():
            soundfile.write(folder / name, sentence_audio("red blue") if audio is None else audio, 22_050)
    with (folder / "transcripts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["audio", "text"])
        writer.writerows(rows)
    return folder


def _refusal(tiny_whisper, tmp_path, source) -> str:
    recipe = validate_recipe({"model": {"path": str(tiny_whisper)}, "data": {"source": str(source),
                                                                             "cache_dir": str(tmp_path / "cache")},
                              "train": {"max_steps": 1}, "output": {"dir": str(tmp_path / "run"),
                                                                    "progress": False}})
    with pytest.raises(UptrainError) as caught:
        train(recipe)
    message = str(caught.value)
    assert "\n" not in message
    assert not any((tmp_path / "run").glob("model*"))  # no model written
    return message


def test_a_multilingual_whisper_without_its_language_is_refused(tiny_whisper, tmp_path):
    """Its prompt opens with a language token: without one every transcript token would sit a position early."""
    model = make_multilingual(tiny_whisper, tmp_path / "multilingual")
    folder = _write_clips(tmp_path / "clips", [("a.wav", "red blue")])
    recipe = validate_recipe({"model": {"path": str(model)}, "data": {"source": str(folder),
                                                                      "cache_dir": str(tmp_path / "cache")},
                              "train": {"max_steps": 1}, "output": {"dir": str(tmp_path / "run"), "progress": False}})
    with pytest.raises(UptrainError, match="multilingual whisper.*data.language.*e.g. en"):
        train(recipe)
    assert not any((tmp_path / "run").glob("model*"))


def test_the_decoder_prompt_is_the_one_generate_writes_from_the_generation_config(tiny_whisper, tmp_path):
    """The language given, then transcribe and no-timestamps, as the generation config names them (what whisper's
    generate() writes and audio calibration writes); an English-only model without them has no prompt; a language
    the model lacks is refused naming the setting."""
    from transformers import AutoConfig, AutoTokenizer

    from gqa_toolkit.uptrain.speech import speech_task

    multilingual = make_multilingual(tiny_whisper, tmp_path / "multilingual")
    config, tokenizer = AutoConfig.from_pretrained(multilingual), AutoTokenizer.from_pretrained(multilingual)
    task = speech_task(config, tokenizer, 32, "de")
    assert task.prompt == (WHISPER_LANGUAGES["<|de|>"], WHISPER_TRANSCRIBE, WHISPER_NO_TIMESTAMPS)
    assert task.labels([5, 6])[:6] == [*task.prompt, 5, 6, config.eos_token_id]
    with pytest.raises(UptrainError, match=r"data.language fr is not one of .* 2 languages; give a code such as "
                                           r"(en, de|de, en)$"):
        speech_task(config, tokenizer, 32, "fr")
    english = AutoConfig.from_pretrained(tiny_whisper)
    assert speech_task(english, AutoTokenizer.from_pretrained(tiny_whisper), 32, None).prompt == ()
    with pytest.raises(UptrainError, match="names no languages .*; drop data.language"):
        speech_task(english, AutoTokenizer.from_pretrained(tiny_whisper), 32, "en")


def test_unreadable_audio_is_refused_naming_the_file(tiny_whisper, tmp_path):
    folder = _write_clips(tmp_path / "clips", [("a.wav", "red blue")])
    (folder / "b.wav").write_bytes(b"RIFF not really a wav file")
    _write_clips(folder, [("a.wav", "red blue"), ("b.wav", "blue")])
    message = _refusal(tiny_whisper, tmp_path, folder)
    assert f"audio {folder / 'b.wav'} cannot be read" in message and "give a wav or flac file" in message


def test_empty_audio_is_refused_naming_the_file(tiny_whisper, tmp_path):
    folder = _write_clips(tmp_path / "clips", [("a.wav", "red blue")], audio=np.zeros(0, dtype=np.float32))
    assert f"audio {folder / 'a.wav'} is empty" in _refusal(tiny_whisper, tmp_path, folder)


def test_a_rate_that_cannot_be_resampled_is_refused_naming_the_file(tiny_whisper, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    soundfile.write(folder / "low.wav", np.zeros(400, dtype=np.float32), 400)
    _write_clips(folder, [("low.wav", "red")])
    message = _refusal(tiny_whisper, tmp_path, folder)
    assert f"audio {folder / 'low.wav'} is sampled at 400 Hz, too low to resample to 16000 Hz" in message


def test_audio_without_a_transcript_is_refused_naming_the_file(tiny_whisper, tmp_path):
    folder = _write_clips(tmp_path / "clips", [("a.wav", "red blue")])
    soundfile.write(folder / "stray.flac", sentence_audio("gold"), 22_050)
    message = _refusal(tiny_whisper, tmp_path, folder)
    assert f"audio {folder / 'stray.flac'} has no transcript in {folder / 'transcripts.csv'}" in message


def test_an_empty_transcript_and_a_missing_file_are_refused(tiny_whisper, tmp_path):
    folder = _write_clips(tmp_path / "clips", [("a.wav", "red blue"), ("b.wav", "  ")])
    assert f"audio {folder / 'b.wav'} has no transcript" in _refusal(tiny_whisper, tmp_path, folder)
    other = _write_clips(tmp_path / "other", [("a.wav", "red"), ("gone.wav", "blue")])
    (other / "gone.wav").unlink()
    assert f"audio {other / 'gone.wav'} (listed in" in _refusal(tiny_whisper, tmp_path, other)


def test_audio_longer_than_the_window_is_refused(tiny_whisper, tmp_path):
    folder = _write_clips(tmp_path / "clips", [("long.wav", "red")], audio=np.zeros(22_050 * 2, dtype=np.float32))
    assert f"audio {folder / 'long.wav'} lasts 2.0 s, longer than the model's 1 s window" in \
        _refusal(tiny_whisper, tmp_path, folder)


def test_text_for_a_speech_model_is_refused_with_what_to_pass(tiny_whisper, tmp_path):
    message = _refusal(tiny_whisper, tmp_path, "python-stdlib")
    assert "encoder takes audio, and python-stdlib is text" in message and "wav/flac" in message


def test_tone_corpus_round_trips_through_soundfile(tmp_path):
    transcripts = write_tone_corpus(tmp_path, count=3)
    rows = list(csv.DictReader(transcripts.open()))
    samples, rate = read_audio(tmp_path / rows[0]["audio"], rows[0]["audio"])
    assert rate == 22_050 and len(rows) == 3
    np.testing.assert_allclose(samples, sentence_audio(rows[0]["text"]), atol=1e-4)  # 16-bit PCM


def test_a_dataset_with_an_audio_column_reads_through_soundfile(tiny_whisper, tmp_path):
    """A parquet file of datasets' Audio values ({bytes, path}), decoded by soundfile rather than datasets' own
    decoder (torchcodec and ffmpeg), becomes the same features as the same clips in a folder."""
    import datasets

    from gqa_toolkit.uptrain.corpora import TextCorpus
    from gqa_toolkit.uptrain.data import speech_rows
    from conftest import toolkit_config as load_config, toolkit_tokenizer as load_tokenizer
    from gqa_toolkit.uptrain.recipe import DataSection, ObjectiveSection
    from gqa_toolkit.uptrain.tasks import build_task

    transcripts = write_tone_corpus(tmp_path / "clips", count=3)
    rows = list(csv.DictReader(transcripts.open()))
    audio = [{"bytes": (tmp_path / "clips" / r["audio"]).read_bytes(), "path": r["audio"]} for r in rows]
    table = datasets.Dataset.from_dict({"speech": audio, "words": [r["text"] for r in rows]})
    table.cast_column("speech", datasets.Audio(decode=False)).to_parquet(str(tmp_path / "clips.parquet"))

    config, tokenizer = load_config(tiny_whisper), load_tokenizer(tiny_whisper)
    made = {}
    for source, audio_column, text_column in ((tmp_path / "clips.parquet", "speech", "words"),
                                              (tmp_path / "clips", "audio", "text")):
        data = DataSection(source=str(source), audio_column=audio_column, text_column=text_column,
                           cache_dir=str(tmp_path / "cache"))
        task = build_task(ObjectiveSection(), data, config, tokenizer)
        made[source.suffix] = speech_rows(TextCorpus(str(source), "train", text_column=text_column), tokenizer,
                                          task, data).with_format("numpy")[:]
    np.testing.assert_array_equal(made[".parquet"]["input_features"], made[""]["input_features"])
    np.testing.assert_array_equal(made[".parquet"]["labels"], made[""]["labels"])


def test_a_transcript_longer_than_the_target_is_cut_without_eos():
    from gqa_toolkit.uptrain.speech import SpeechTranscripts
    from gqa_toolkit.uptrain.tasks import IGNORE

    rows = SpeechTranscripts(row_length=8, target_length=6, prompt=(1, 2), eos_id=9, pad_id=0, decoder_start_id=3,
                             feature_extractor=None)
    assert rows.labels([5, 6]) == [1, 2, 5, 6, 9, IGNORE]
    assert rows.labels([5, 6, 7]) == [1, 2, 5, 6, 7, 9]
    assert rows.labels([5, 6, 7, 8, 4]) == [1, 2, 5, 6, 7, 8]  # cut in mid-speech: no eos to learn there


def test_transcripts_are_tokenized_after_a_space_as_the_decoder_writes_them(tiny_whisper):
    from transformers import AutoTokenizer

    from gqa_toolkit.audio import transcript_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_whisper)
    written = tokenizer(" gray teal", add_special_tokens=False)["input_ids"]
    assert transcript_ids(tokenizer, ["gray teal", " gray teal "]) == [written, written]
    assert written != tokenizer("gray teal", add_special_tokens=False)["input_ids"]
