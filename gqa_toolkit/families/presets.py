"""Named model shapes, for the tiny models that run anywhere (the tiny recipes, `gqa_toolkit.uptrain.tiny`, the
tests) and the real-size shapes the benchmarks build on the meta device or at random. A shape is data: its model
type and the transformers config values that differ from the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.transformers_config().is_encoder_decoder)

    def transformers_config(self, **overrides):
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **{**self.config, **overrides})

    def model(self, **overrides):
        """A randomly initialised model of this shape (seed it first)."""
        import transformers

        from .spec import lm_auto_class_name

        config = self.transformers_config(**overrides)
        auto = getattr(transformers, lm_auto_class_name(self.model_type, config.is_encoder_decoder))
        return auto.from_config(config)


_T5_V1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # t5-v1.1's choices

PRESETS: dict[str, Preset] = {
    # two layers, hidden 64, four heads that each have their own K/V (MHA)
    "tiny-llama": Preset("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)),
    # the same size with t5-v1.1's choices; no dropout, whose draws differ per process
    "tiny-t5": Preset("t5", dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                                 dropout_rate=0.0, **_T5_V1_1)),
    "t5-v1.1-small": Preset("t5", dict(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8,
                                       num_decoder_layers=8, **_T5_V1_1)),
    "t5-v1.1-base": Preset("t5", dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12,
                                      num_decoder_layers=12, **_T5_V1_1)),
    "t5-v1.1-large": Preset("t5", dict(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24,
                                       num_decoder_layers=24, **_T5_V1_1)),
    # TinyLlama-1.1B's shape with one K/V head per query head
    "llama-1b-mha": Preset("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                         num_attention_heads=16, num_key_value_heads=16,
                                         max_position_embeddings=16384)),
    # width 2048, depth chosen per run (the calibration-scale benchmark)
    "llama-2048-wide": Preset("llama", dict(hidden_size=2048, intermediate_size=5504, num_attention_heads=16,
                                            num_key_value_heads=16, vocab_size=8192, tie_word_embeddings=False,
                                            max_position_embeddings=2048)),
    # Whisper's base and large-v3 shapes: 30 s of audio is 1,500 encoder positions
    "whisper-base": Preset("whisper", dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                                           decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                                           num_mel_bins=80, vocab_size=51865)),
    "whisper-large-v3": Preset("whisper", dict(d_model=1280, encoder_layers=32, decoder_layers=32,
                                               encoder_attention_heads=20, decoder_attention_heads=20,
                                               encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
                                               vocab_size=51866)),
    # Llama-2-7B's shape (MHA)
    "llama-7b": Preset("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                     max_position_embeddings=4096)),
}
