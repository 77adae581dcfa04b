"""Tiny configs (2 layers, hidden 64) for every family the converter supports, and where each keeps its K/V.

`kv_access` names how the independent reference in test_convert_parity.py reaches the K/V heads of a stock
transformers attention module; it is test-side knowledge, written without the converter's specs.
"""

from dataclasses import dataclass, field

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128,
            max_position_embeddings=128, num_attention_heads=4, num_key_value_heads=4)


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict = field(default_factory=dict)
    kv_access: str = "separate"  # separate | phi3 | falcon | bigcode
    groups: int = 2  # a G below the source's KV heads
    kv_norm: str | None = None  # olmo2 | cohere | stablelm


FAMILIES = [
    Family("llama"),
    Family("mistral"),
    Family("mixtral", dict(num_local_experts=2, num_experts_per_tok=1)),
    Family("granite"),
    Family("gemma", dict(head_dim=16)),
    Family("gemma2", dict(head_dim=16)),
    Family("gemma3_text", dict(head_dim=16)),
    Family("qwen2"),
    Family("qwen3", dict(head_dim=16)),
    Family("olmo"),
    Family("olmo2", kv_norm="olmo2"),
    Family("starcoder2"),
    Family("phi", dict(partial_rotary_factor=0.5)),
    Family("cohere", dict(use_qk_norm=True), kv_norm="cohere"),
    Family("stablelm", dict(qk_layernorm=True, use_qkv_bias=True), kv_norm="stablelm"),
    Family("phi3", dict(pad_token_id=0), kv_access="phi3"),
    Family("falcon", dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=4, bias=True,
                          num_key_value_heads=None), kv_access="falcon"),
    Family("gpt_bigcode", dict(multi_query=False, n_positions=128, num_key_value_heads=None), kv_access="bigcode",
           groups=1),
]
FAMILY_IDS = [f.model_type for f in FAMILIES]


def family_config(family: Family) -> dict:
    config = {**BASE, **family.config}
    return {k: v for k, v in config.items() if v is not None}
