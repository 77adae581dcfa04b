"""Whisper through the commands: gqa-convert's record of the KV cache equals what a prefill really caches (the
decoder's self-attention cache per token plus the cross-attention cache per encoder position), gqa-eval speed
encodes the audio window and reports the cache shrinking by H/G, and lm-eval's text tasks refuse the model in one
line (uptraining and the other measures take audio: tests/test_speech_*.py)."""

import json

import pytest
from click.testing import CliRunner
from families import NO_NATIVE_FAMILIES

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.families.spec import spec_for
from gqa_toolkit.eval.cli import main as eval_main
from gqa_toolkit.eval.speed import kv_cache_bytes_per_token
from conftest import toolkit_model as load_model

WHISPER = next(f for f in NO_NATIVE_FAMILIES if f.model_type == "whisper")
WINDOW = WHISPER.config["max_source_positions"]


@pytest.fixture(scope="module")
def whisper(no_native_dirs, tmp_path_factory):
    """The tiny MHA whisper and its conversions to 2 KV heads and to MQA."""
    root = tmp_path_factory.mktemp("whisper")
    src = no_native_dirs["whisper"]
    return {"source": src, **{g: convert_checkpoint(src, root / f"g{g}", groups=g, progress=False) for g in (2, 1)}}


@pytest.mark.parametrize("groups", [2, 1])
def test_record_equals_the_cache_a_prefill_fills(whisper, groups):
    record = json.loads((whisper[groups] / "config.json").read_text())["gqa_conversion"]
    assert record["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(load_model(whisper[groups]))
    assert record["kv_cache_bytes_per_token_source"] == kv_cache_bytes_per_token(load_model(whisper["source"]))
    # K and V x (self + cross) x 2 decoder layers x G heads x 16 dims x 4 bytes
    assert record["kv_cache_bytes_per_token"] == 2 * 2 * 2 * groups * 16 * 4


def test_card_and_auto_class_say_speech(whisper):
    config = json.loads((whisper[2] / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSpeechSeq2Seq"] == "gqa_bart.GQAWhisperForConditionalGeneration"
    assert config["decoder_num_key_value_heads"] == 2 and "num_key_value_heads" not in config
    assert "pipeline_tag: automatic-speech-recognition" in (whisper[2] / "README.md").read_text()
    assert type(load_model(whisper[2])).__name__ == "GQAWhisperForConditionalGeneration"


def test_speed_encodes_the_window_and_decodes_with_both_caches(whisper):
    result = CliRunner().invoke(eval_main, ["speed", str(whisper[1]), "--batch-sizes", "2", "--decode-steps", "3",
                                            "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"converted", "source"}
    assert all(r["context"] == WINDOW and r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert rows["source"]["kv_bytes_per_token"] / rows["converted"]["kv_bytes_per_token"] == WHISPER.heads


def test_speed_refuses_another_context_with_the_window(whisper):
    result = CliRunner().invoke(eval_main, ["speed", str(whisper[2]), "--contexts", "128"])
    assert result.exit_code == 2
    assert f"fixed window of {WINDOW} positions; leave --contexts out or pass --contexts {WINDOW}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_lm_eval_tasks_refuse_an_audio_model(whisper):
    """lm-eval's tasks are text; gqa-eval's own measures take (audio, transcript) pairs (tests/test_speech_*.py)."""
    result = CliRunner().invoke(eval_main, ["tasks", str(whisper[2]), "--tasks", "hellaswag"])
    assert result.exit_code == 2, result.output
    assert "encoder takes audio features, and these tasks are text; score it on (audio, transcript) pairs with " \
           "gqa-eval wer" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_spec_names_the_audio_input():
    audio = spec_for("gqa_whisper").audio
    assert (audio.mel_bins_attr, audio.positions_attr, audio.frames_per_position) == \
        ("num_mel_bins", "max_source_positions", 2)


def test_speed_refuses_decoding_past_the_decoders_positions(whisper):
    limit = WHISPER.config["max_target_positions"]
    result = CliRunner().invoke(eval_main, ["speed", str(whisper[2]), "--decode-steps", str(limit)])
    assert result.exit_code == 2
    assert f"decoder's {limit} positions; take at most {limit - 1}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_record_counts_only_the_caches_with_attention_all(whisper, tmp_path):
    """The encoder's self-attention keeps no KV cache: converting it too leaves the per-token cache figures as the
    caches a prefill fills, and the default output name says the scope."""
    out = convert_checkpoint(whisper["source"], tmp_path / "all", groups=1, attention="all", progress=False)
    record = json.loads((out / "config.json").read_text())["gqa_conversion"]
    assert record["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(load_model(out))
    assert record["kv_cache_bytes_per_token_source"] == kv_cache_bytes_per_token(load_model(whisper["source"]))
    from gqa_toolkit.convert.options import ConversionOptions

    assert ConversionOptions(groups=1, attention="all").output_suffix("decoder") == "-gqa1-mean-attention-all"
    assert ConversionOptions(groups=1, attention="all").output_suffix("all") == "-gqa1-mean"  # the default named
