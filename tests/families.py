"""Tiny configs (2 layers, hidden 64) for every family the converter supports, and where each keeps its K/V.

`kv_access` names how the independent reference in test_convert_parity.py reaches the K/V heads of a stock
transformers attention module; it is test-side knowledge, written without the converter's specs.
"""

from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version

from gqa_toolkit.families.presets import PRESETS

# stock falcon repeated its K/V heads to one per query head before caching them, up to transformers 5.24
FALCON_CACHES_QUERY_HEADS = Version(transformers.__version__) < Version("5.25")

BASE = {**PRESETS["tiny-llama"].config, "vocab_size": 128, "max_position_embeddings": 128}


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict = field(default_factory=dict)
    kv_access: str = "separate"  # separate | phi3 | falcon | bigcode
    groups: int = 2  # a G below the source's KV heads
    kv_norm: str | None = None  # olmo2 | cohere | stablelm
    # stock transformers repeats the K/V heads to one per query head before caching them (falcon with
    # new_decoder_architecture): the checkpoint is GQA, its transformers KV cache is not
    caches_query_heads: bool = False


FAMILIES = [
    Family("llama"),
    Family("mistral"),
    Family("mixtral", dict(num_local_experts=2, num_experts_per_tok=1)),
    Family("granite"),
    Family("gemma", dict(head_dim=16)),
    Family("gemma2", dict(head_dim=16)),
    Family("gemma3_text", dict(head_dim=16)),
    Family("qwen2"),
    Family("qwen2_moe", dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32)),
    Family("qwen3", dict(head_dim=16)),
    Family("olmo"),
    Family("olmo2", kv_norm="olmo2"),
    Family("starcoder2"),
    Family("phi", dict(partial_rotary_factor=0.5)),
    Family("cohere", dict(use_qk_norm=True), kv_norm="cohere"),
    Family("stablelm", dict(qk_layernorm=True, use_qkv_bias=True), kv_norm="stablelm"),
    Family("phi3", dict(pad_token_id=0), kv_access="phi3"),
    Family("falcon", dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=4, bias=True,
                          num_key_value_heads=None), kv_access="falcon", caches_query_heads=FALCON_CACHES_QUERY_HEADS),
    Family("gpt_bigcode", dict(multi_query=False, n_positions=128, num_key_value_heads=None), kv_access="bigcode",
           groups=1),
]
FAMILY_IDS = [f.model_type for f in FAMILIES]


def family_config(family: Family) -> dict:
    config = {**BASE, **family.config}
    return {k: v for k, v in config.items() if v is not None}


# Families whose transformers modeling has no KV-head count: the toolkit ships GQA modeling code for them.
# `auto` is the Auto class that builds the stock model; `kv_access` how tests/reference.py reaches its K/V heads.
@dataclass(frozen=True)
class NoNativeFamily:
    model_type: str
    config: dict
    auto: str = "AutoModelForCausalLM"
    heads: int = 4
    head_dim: int = 16
    audio: bool = False  # the encoder takes log-mel features (whisper), not token ids


BART = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128, max_position_embeddings=128)

NO_NATIVE_FAMILIES = [
    # d_kv (8) is independent of d_model / num_heads (16), as in t5-v1.1 and mT5
    NoNativeFamily("t5", dict(d_model=64, d_ff=128, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                              vocab_size=128, relative_attention_num_buckets=8, decoder_start_token_id=0,
                              feed_forward_proj="gated-gelu"), auto="AutoModelForSeq2SeqLM", head_dim=8),
    NoNativeFamily("bart", dict(BART, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                                forced_eos_token_id=None), auto="AutoModelForSeq2SeqLM"),
    NoNativeFamily("mbart", dict(BART, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                                 forced_eos_token_id=None), auto="AutoModelForSeq2SeqLM"),
    NoNativeFamily("marian", dict(BART, pad_token_id=127, eos_token_id=0, decoder_start_token_id=127,
                                  forced_eos_token_id=None), auto="AutoModelForSeq2SeqLM"),
    NoNativeFamily("whisper", dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128,
                                   num_mel_bins=8, max_source_positions=16, max_target_positions=64, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                   begin_suppress_tokens=None),
                   auto="AutoModelForSpeechSeq2Seq", audio=True),
    NoNativeFamily("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0)),
    NoNativeFamily("gpt_neox", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=128, max_position_embeddings=128, rotary_pct=0.5,
                                    bos_token_id=0, eos_token_id=0)),
    NoNativeFamily("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=0,
                                eos_token_id=0)),
    NoNativeFamily("gptj", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, rotary_dim=8,
                                bos_token_id=0, eos_token_id=0)),
    NoNativeFamily("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                               max_position_embeddings=128, word_embed_proj_dim=64)),
]
NO_NATIVE_IDS = [f.model_type for f in NO_NATIVE_FAMILIES]


def encoder_inputs(family, ids: torch.Tensor, mask: torch.Tensor | None = None, seed: int = 1) -> dict:
    """What an encoder-decoder's encoder takes for a batch like `ids` (B, T): the ids and their mask, or for an audio
    family log-mel features (B, mel bins, 2 * positions: whisper's first convolution halves the frames), which
    have no padding mask."""
    if not getattr(family, "audio", False):
        return {"input_ids": ids, **({"attention_mask": mask} if mask is not None else {})}
    frames = 2 * family.config["max_source_positions"]
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(len(ids), family.config["num_mel_bins"], frames, generator=g)}
