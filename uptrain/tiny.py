"""`python -m gqa_toolkit.uptrain.tiny OUT_DIR`: a tiny multi-head llama to try the toolkit on with no download.

Two layers, hidden 64, 4 heads that each have their own K/V (MHA), randomly initialised, with a byte-level BPE
tokenizer trained on the python-stdlib corpus. Convert it with gqa-convert, then uptrain it with
recipes/tiny-uptrain.yaml.
"""

from __future__ import annotations

from pathlib import Path

import click

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512)


def build_tiny_mha(out: str | Path, vocab_size: int = 2048, tokenizer_files: int = 300, seed: int = 0) -> Path:
    """Write a tiny MHA llama plus its tokenizer into `out` and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import corpus
    from .tokenizer import train_tokenizer

    out = Path(out)
    tokenizer = train_tokenizer((r["text"] for r in corpus.iter_texts("train", limit=tokenizer_files)), vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--vocab-size", default=2048, show_default=True, help="BPE vocabulary size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
def main(out: str, vocab_size: int, seed: int) -> None:
    """Write a tiny randomly initialised MHA llama and its tokenizer into OUT."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise click.ClickException(f"{out} is not empty; choose a new directory")
    click.echo(f"tiny MHA llama written to {build_tiny_mha(out, vocab_size, seed=seed)}")


if __name__ == "__main__":
    main()
