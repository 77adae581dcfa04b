"""The model card a conversion writes is a Hugging Face card that `ModelCard.load` reads: base_model, library and
the source card's metadata in its front matter, and a conversion section true for the method and options used."""

import shutil

from huggingface_hub import ModelCard

from gqa_toolkit.convert import convert_checkpoint

SOURCE_CARD = """---
license: apache-2.0
datasets:
- some/corpus
language:
- en
tags:
- tiny
---
# a tiny llama
"""


def test_card_metadata_carries_the_source_and_its_card(llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    (src / "README.md").write_text(SOURCE_CARD)
    out = convert_checkpoint(src, tmp_path / "out", groups=2, progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(src.resolve()) and card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["some/corpus"]
    assert card.data.language == ["en"] and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["gqa", "gqa-toolkit", "tiny"]
    assert "| KV heads | 4 -> 2" in card.text and "| KV cache per token | 1,024 -> 512 bytes (0.5x)" in card.text
    assert "Q and O" not in card.text  # mean-pooling leaves them as they are
    assert "Not uptrained" in card.text


def test_card_of_a_hub_snapshot_names_the_repository(llama_dir, tmp_path):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("c" * 40)
    shutil.copytree(llama_dir, snapshot)
    out = convert_checkpoint(snapshot, tmp_path / "out", groups=1, progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny" and "Converted from `org/tiny`" in card.text


def test_card_says_what_a_layer_method_and_its_options_changed(llama_dir, tmp_path):
    out = convert_checkpoint(llama_dir, tmp_path / "out", groups=2, method="aligned", grouping="similarity",
                             preserve_norm=True, calibration="none", progress=False)
    text = ModelCard.load(out / "README.md").text
    assert "Q and O change too" in text and "grouped by similarity" in text and "mean head norm" in text
    assert "| calibration | none (weights only) |" in text and "| norm preservation | yes |" in text


def test_encoder_decoders_are_tagged_text2text(no_native_dirs, tmp_path):
    for family in ("t5", "bart"):
        out = convert_checkpoint(no_native_dirs[family], tmp_path / family, groups=2, progress=False)
        assert ModelCard.load(out / "README.md").data.pipeline_tag == "text2text-generation", family


def test_a_source_card_without_front_matter_carries_nothing_and_says_nothing(llama_dir, tmp_path, caplog):
    """An uptrained model's card, from a source without a card, is markdown alone: converting it again logs no
    warning of the hub library's about the missing metadata."""
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    (src / "README.md").write_text("\n\n## Uptraining\n\nUptrained for 4 steps.\n")
    out = convert_checkpoint(src, tmp_path / "out", groups=2, progress=False)
    assert ModelCard.load(out / "README.md").data.tags == ["gqa", "gqa-toolkit"]
    assert not [r for r in caplog.records if "metadata" in r.getMessage()], caplog.text


def test_a_source_card_after_blank_lines_still_carries_its_metadata(llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    (src / "README.md").write_text("\n\n" + SOURCE_CARD)
    out = convert_checkpoint(src, tmp_path / "out", groups=2, progress=False)
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"
