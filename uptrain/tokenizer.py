"""Train a small byte-level BPE tokenizer locally (no hub), for tiny models in tests, recipes and the ablation."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, sentinels: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with bos/eos/pad special tokens; `save_pretrained` writes it into a model dir.

    Byte-level means every input encodes (no unknown token), so a tiny vocabulary still covers any text.
    `sentinels` adds T5's span-corruption sentinels <extra_id_0>, <extra_id_1>, ... as special tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *(f"<extra_id_{i}>" for i in range(sentinels))],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
