"""`python -m gqa_toolkit.uptrain.tiny OUT_DIR [--family t5]`: a tiny multi-head model to try the toolkit on with no
download.

llama: two layers, hidden 64, 4 heads that each have their own K/V (MHA). t5: the same size with t5-v1.1's choices
(gated GELU, untied head), two encoder and two decoder layers. Both are randomly initialised, with a byte-level BPE
tokenizer trained on the python-stdlib corpus (with T5's <extra_id_N> sentinels for t5). whisper: two encoder and
two decoder layers over 8 mel bins and a 1 s window, its tokenizer learnt from the tone words of
gqa_toolkit.uptrain.tones. Convert it with gqa-convert, then uptrain it with recipes/tiny-uptrain.yaml,
recipes/tiny-t5-uptrain.yaml or recipes/tiny-whisper-uptrain.yaml.
"""

from __future__ import annotations

from pathlib import Path

import click

from gqa_toolkit.command import HELP, Command, user_errors

# family -> (preset, span-corruption sentinels in the tokenizer)
FAMILIES = {"llama": ("tiny-llama", 0), "t5": ("tiny-t5", 100)}


def build_tiny_mha(out: str | Path, vocab_size: int = 2048, tokenizer_files: int = 300, seed: int = 0,
                   family: str = "llama", **config) -> Path:
    """Write a tiny MHA model of `family` plus its tokenizer into `out` and return the path; `config` overrides
    the preset's sizes (bench/ builds deeper ones)."""
    import torch

    from gqa_toolkit import corpus
    from gqa_toolkit.families.presets import PRESETS

    from .tokenizer import train_tokenizer

    preset, sentinels = FAMILIES[family]
    preset = PRESETS[preset]
    out = Path(out)
    tokenizer = train_tokenizer((r["text"] for r in corpus.iter_texts("train", limit=tokenizer_files)), vocab_size,
                                sentinels=sentinels)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if preset.is_encoder_decoder:
        special["decoder_start_token_id"] = tokenizer.pad_token_id  # T5 starts decoding from pad
    preset.model(vocab_size=len(tokenizer), **special, **config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# whisper: two encoder and two decoder layers of hidden 64 with 4 heads, 8 mel bins over a 1 s window of 16 positions
TINY_WHISPER = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8,
                    max_source_positions=16, max_target_positions=64, begin_suppress_tokens=None)
TINY_FEATURES = dict(feature_size=8, sampling_rate=16_000, hop_length=500, chunk_length=1, n_fft=1000)  # 32 frames


def build_tiny_whisper(out: str | Path, seed: int = 0, **config) -> Path:
    """A tiny MHA whisper with its feature extractor and a byte-level BPE tokenizer learnt from the words of the
    synthetic tone speech (gqa_toolkit.uptrain.tones)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from .tokenizer import train_tokenizer
    from .tones import sentences

    out = Path(out)
    tokenizer = train_tokenizer(sentences(2000, seed=1), vocab_size=300)
    torch.manual_seed(seed)
    config = WhisperConfig(**{**TINY_WHISPER, **config}, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.bos_token_id)
    WhisperForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(**TINY_FEATURES).save_pretrained(out)
    return out


@click.command(cls=Command, context_settings=HELP)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(sorted([*FAMILIES, "whisper"])), default="llama", show_default=True)
@click.option("--vocab-size", default=2048, show_default=True, help="BPE vocabulary size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
@user_errors("python -m gqa_toolkit.uptrain.tiny", "nothing useful was written; remove OUT and run it again")
def main(out: str, family: str, vocab_size: int, seed: int) -> None:
    """Write a tiny randomly initialised MHA model and its tokenizer into OUT."""
    from .errors import UptrainError

    if Path(out).exists() and any(Path(out).iterdir()):
        raise UptrainError(f"{out} is not empty; choose a new directory")
    built = build_tiny_whisper(out, seed) if family == "whisper" else build_tiny_mha(out, vocab_size, seed=seed,
                                                                                      family=family)
    click.echo(f"tiny MHA {family} written to {built}")


if __name__ == "__main__":
    main()
