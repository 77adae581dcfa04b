"""Audio calibration for whisper: a folder of clips (with transcripts, or transcribed by the source) calibrates
`--method fit`: the record says so, cross-attention's key moments are those of the stock whisper run whole on the
same features, the calibrated fit is closer to the source on held-out clips than the weights-only fit, and
calibration of the wrong kind for the family is refused in one line."""

import csv
import json
import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner

from gqa_toolkit.convert import ConversionError, convert_checkpoint
from gqa_toolkit.convert.cli import main as convert_main
from gqa_toolkit.families.spec import spec_for
from gqa_toolkit.convert.methods import block_stream as blockwise
from gqa_toolkit.convert.methods.audio_calibration import audio_calibration
from conftest import WHISPER_LANGUAGES, WHISPER_NO_TIMESTAMPS, WHISPER_TRANSCRIBE, make_multilingual
from conftest import toolkit_model as load_model
from gqa_toolkit.uptrain.tiny import build_tiny_whisper
from gqa_toolkit.uptrain.tones import write_tone_corpus

AUTO = "AutoModelForSpeechSeq2Seq"


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """The tiny whisper, 24 tone clips to calibrate on (transcripts.csv beside them) and 8 held out."""
    root = tmp_path_factory.mktemp("audio-calibration")
    whisper = build_tiny_whisper(root / "whisper")
    write_tone_corpus(root / "all", count=32, seed=3)
    rows = list(csv.DictReader((root / "all" / "transcripts.csv").open()))
    for folder, part in (("calibration", rows[:24]), ("held-out", rows[24:])):
        (root / folder).mkdir()
        for row in part:
            shutil.copy(root / "all" / row["audio"], root / folder / row["audio"])
        with (root / folder / "transcripts.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["audio", "text"])
            writer.writeheader()
            writer.writerows(part)
    return {"whisper": whisper, "calibration": root / "calibration", "held_out": root / "held-out", "root": root}


def _kl(source, converted, batches) -> float:
    """Mean KL(source || converted) of the decoder's next-token distributions over the batches' positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            p = source(**batch).logits.log_softmax(-1)
            q = converted(**batch).logits.log_softmax(-1)
            mask = batch.get("decoder_attention_mask", torch.ones(p.shape[:2]))
            total += float(((p.exp() * (p - q)).sum(-1) * mask).sum())
            count += int(mask.sum())
    return total / count


def test_clips_are_batched_by_transcript_length(speech, tmp_path):
    """Each batch holds alike transcript lengths (little padding), each clip once with its own features."""
    rows = list(csv.DictReader((speech["calibration"] / "transcripts.csv").open()))[:8]
    for i, row in enumerate(rows):  # long and short transcripts alternate
        row["text"] = " ".join([row["text"]] * (6 if i % 2 else 1))
    (tmp_path / "clips").mkdir()
    for row in rows:
        shutil.copy(speech["calibration"] / row["audio"], tmp_path / "clips" / row["audio"])
    with (tmp_path / "clips" / "transcripts.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["audio", "text"])
        writer.writeheader()
        writer.writerows(rows)
    batches, clips, tokens, languages = audio_calibration(speech["whisper"], tmp_path / "clips", 8, AUTO,
                                                     batch_size=4)
    real = [int(b["decoder_attention_mask"].sum()) if "decoder_attention_mask" in b else b["decoder_input_ids"].numel()
            for b in batches]
    widths = sorted(b["decoder_input_ids"].shape[1] for b in batches)
    assert clips == 8 and sum(real) == tokens and languages == {}  # an English-only model: no language token
    assert widths[0] < widths[1]  # the short transcripts share one batch, the long ones the other
    assert sum(b["decoder_input_ids"].numel() for b in batches) < 1.3 * tokens
    unbatched, *_ = audio_calibration(speech["whisper"], tmp_path / "clips", 8, AUTO, batch_size=1)
    by_features = {b["input_features"][0].sum().item(): b["decoder_input_ids"][0] for b in unbatched}
    for batch in batches:
        for features, ids in zip(batch["input_features"], batch["decoder_input_ids"]):
            expected = by_features[features.sum().item()]
            assert torch.equal(ids[: len(expected)], expected)


@pytest.mark.slow
def test_audio_calibration_fits_closer_to_the_source_on_held_out_clips(speech, tmp_path):
    src = speech["whisper"]
    result = CliRunner().invoke(convert_main, [str(src), "-o", str(tmp_path / "fit-audio"), "--groups", "2", "--method",
                                               "fit", "--calibration", str(speech["calibration"]), "-q"])
    assert result.exit_code == 0, result.output
    weights = convert_checkpoint(src, tmp_path / "fit-weights", groups=2, method="fit", calibration="none",
                                 progress=False)
    record = json.loads((tmp_path / "fit-audio" / "config.json").read_text())["gqa_conversion"]
    assert record["calibration_data"] == "audio" and record["calibration_sequences"] == 24
    assert record["calibration_transcripts"] == "given" and record["calibration_tokens"] > 24
    held_out, *_ = audio_calibration(src, speech["held_out"], 64, AUTO)
    source = load_model(src).eval()
    calibrated = _kl(source, load_model(tmp_path / "fit-audio").eval(), held_out)
    uncalibrated = _kl(source, load_model(weights).eval(), held_out)
    assert calibrated < uncalibrated, (calibrated, uncalibrated)


def test_the_stream_reads_cross_attention_keys_of_the_whole_model(speech):
    """The moments of cross-attention's key inputs (the encoder's last states) and of the decoder's queries, from
    the stream run block by block, equal hooks on the stock whisper run whole on the same features."""
    src = speech["whisper"]
    batches, clips, tokens, _ = audio_calibration(src, speech["calibration"], 12, AUTO, batch_size=5)
    assert clips == 12 and len(batches) == 3 and "decoder_attention_mask" in batches[0]
    ours = {key: m for step in blockwise.BlockStream(src, spec_for("whisper").blocks, batches)
            for key, m in step.moments.items()}
    model = transformers.WhisperForConditionalGeneration.from_pretrained(src).eval()
    layers = model.model.decoder.layers
    modules = {**{("cross", "keys", i): layer.encoder_attn.k_proj for i, layer in enumerate(layers)},
               **{("decoder", "query", i): layer.self_attn.q_proj for i, layer in enumerate(layers)}}
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, key=key: seen.setdefault(key, []).append(args[0]))
             for key, m in modules.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    for hook in hooks:
        hook.remove()
    for key, xs in seen.items():
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, d + 1)
        torch.testing.assert_close(ours[key].total, xa.T @ xa, rtol=1e-6, atol=1e-6)
    assert ours["cross", "keys", 0].count == 12 * model.config.max_source_positions
    assert ours["decoder", "query", 0].count == sum(b["decoder_input_ids"].numel() for b in batches)


def test_clips_without_transcripts_are_transcribed_by_the_source(speech, tmp_path):
    folder = tmp_path / "clips"
    shutil.copytree(speech["held_out"], folder)
    (folder / "transcripts.csv").unlink()
    out = convert_checkpoint(speech["whisper"], tmp_path / "out", groups=2, method="fit", calibration=folder,
                             progress=False)
    record = json.loads((out / "config.json").read_text())["gqa_conversion"]
    assert record["calibration_transcripts"] == "the source's greedy decoding"
    assert record["calibration_sequences"] == 8


def test_text_calibration_for_whisper_is_refused_with_what_to_pass(speech, tmp_path):
    with pytest.raises(ConversionError) as caught:
        convert_checkpoint(speech["whisper"], tmp_path / "out", groups=2, method="fit", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "takes audio" in message and "--calibration FOLDER" in message
    assert not (tmp_path / "out").exists()


def test_audio_calibration_for_a_text_model_is_refused_with_what_to_pass(speech, llama_dir, tmp_path):
    result = CliRunner().invoke(convert_main, [str(llama_dir), "-o", str(tmp_path / "out"), "--groups", "2", "--method",
                                               "fit", "--calibration", str(speech["calibration"])])
    assert result.exit_code != 0
    assert "holds audio, and llama calibrates on text; pass --calibration python-stdlib" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unreadable_clip_is_refused_naming_the_file(speech, tmp_path):
    folder = tmp_path / "clips"
    shutil.copytree(speech["held_out"], folder)
    (folder / "bad.wav").write_bytes(b"RIFF not really a wav file")
    with (folder / "transcripts.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["bad.wav", "red"])
    result = CliRunner().invoke(convert_main, [str(speech["whisper"]), "-o", str(tmp_path / "out"), "--groups", "2",
                                               "--method", "fit", "--calibration", str(folder)])
    assert result.exit_code != 0
    assert f"audio {folder / 'bad.wav'} cannot be read" in result.output and "give a wav or flac file" in result.output
    assert not (tmp_path / "out").exists()


def test_the_dry_run_counts_clips_over_the_encoder_window(speech, tmp_path):
    result = CliRunner().invoke(convert_main, [str(speech["whisper"]), "-o", str(tmp_path / "out"), "--groups", "2",
                                               "--method", "fit", "--calibration", str(speech["calibration"]),
                                               "--calibration-samples", "24", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"calibration: up to 24 clips of {speech['calibration']} (audio: 16 encoder positions each" in result.output
    assert not (tmp_path / "out").exists()


LANGUAGES, TRANSCRIBE, NO_TIMESTAMPS = WHISPER_LANGUAGES, WHISPER_TRANSCRIBE, WHISPER_NO_TIMESTAMPS


@pytest.fixture(scope="module")
def multilingual(speech, tmp_path_factory):
    return make_multilingual(speech["whisper"], tmp_path_factory.mktemp("multilingual") / "whisper")


def test_a_multilingual_whisper_calibrates_on_the_language_the_source_detects_per_clip(speech, multilingual):
    """Without --calibration-language each clip's prompt holds the language the stock model rates likeliest after
    its start token (as whisper's generate() detects it), then transcribe and no-timestamps."""
    batches, clips, _, languages = audio_calibration(multilingual, speech["calibration"], 12, AUTO, batch_size=4)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(multilingual).eval()
    start = model.config.decoder_start_token_id
    ids = torch.tensor(list(LANGUAGES.values()))
    seen = []
    with torch.no_grad():
        for batch in batches:
            first = model(input_features=batch["input_features"],
                          decoder_input_ids=torch.full((len(batch["input_features"]), 1), start)).logits[:, -1]
            expected = ids[first[:, ids].argmax(-1)]  # (B,)
            prompts = batch["decoder_input_ids"][:, :4]  # (B, 4)
            assert torch.equal(prompts[:, 1], expected)
            assert (prompts[:, 0] == start).all() and (prompts[:, 2] == TRANSCRIBE).all()
            assert (prompts[:, 3] == NO_TIMESTAMPS).all()
            seen += expected.tolist()
    names = {i: token for token, i in LANGUAGES.items()}
    assert clips == 12 and languages == {names[i]: seen.count(i) for i in set(seen)}


def test_a_given_calibration_language_opens_every_prompt_and_is_recorded(speech, multilingual, tmp_path):
    out = convert_checkpoint(multilingual, tmp_path / "out", groups=2, method="fit", calibration=speech["held_out"],
                             calibration_language="de", progress=False)
    record = json.loads((out / "config.json").read_text())["gqa_conversion"]
    assert record["calibration_languages"] == {"<|de|>": 8}
    batches, *_ = audio_calibration(multilingual, speech["held_out"], 8, AUTO, language="de")
    assert all((b["decoder_input_ids"][:, 1] == LANGUAGES["<|de|>"]).all() for b in batches)


@pytest.mark.parametrize("model, calibration, language, named", [
    ("multilingual", "held_out", "xx", "give a code such as de, en"),
    ("whisper", "held_out", "en", "names no languages"),
    ("whisper", "none", "en", "--calibration is none"),
    ("llama", "python-stdlib", "en", "calibrates on text"),
])
def test_a_calibration_language_that_cannot_apply_is_refused_in_one_line(speech, multilingual, llama_dir, tmp_path,
                                                                         model, calibration, language, named):
    source = {"multilingual": multilingual, "whisper": speech["whisper"], "llama": llama_dir}[model]
    result = CliRunner().invoke(convert_main, [str(source), "-o", str(tmp_path / "out"), "--groups", "1", "--method",
                                               "fit", "--calibration", str(speech.get(calibration, calibration)),
                                               "--calibration-language", language, "-q"])
    assert result.exit_code != 0 and named in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
