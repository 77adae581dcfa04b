"""KV-cache bytes per token, and prefill and decode throughput at several context lengths and batch sizes.

Decode is where GQA pays off: each new token reads the whole KV cache, which is H/G times smaller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def _cache_tensors(cache) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    return [t for pair in cache for t in pair]  # legacy tuple of (key, value)


@torch.no_grad()
def kv_cache_bytes_per_token(model, tokens: int = 8) -> float:
    """Bytes the model's own KV cache holds per token, measured from the cache tensors after a prefill."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device=model.device)
    cache = model(input_ids=ids, use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for t in _cache_tensors(cache)) / tokens


@dataclass(frozen=True)
class SpeedPoint:
    context: int
    batch_size: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_step: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, context: int, batch_size: int, decode_steps: int = 16, repeats: int = 3) -> SpeedPoint:
    """Fastest of `repeats` rounds of: prefill `context` tokens, then `decode_steps` single-token steps with the
    cache. Other work on the machine only ever adds time, so the fastest round is the least disturbed (as timeit)."""
    model.eval()
    device = model.device
    vocab = model.config.vocab_size
    prefill_s, decode_s = [], []
    for _ in range(repeats + 1):  # the first round warms up allocators and kernels
        ids = torch.randint(0, vocab, (batch_size, context), device=device)  # (B, T)
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (B, 1)
        for _ in range(decode_steps):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    prefill, decode = min(prefill_s[1:]), min(decode_s[1:])
    return SpeedPoint(context, batch_size, batch_size * context / prefill, batch_size * decode_steps / decode,
                      1000 * decode / decode_steps)
