"""KV-cache bytes per token, and prefill and decode throughput at several context lengths and batch sizes.

Decode is where GQA pays off: each new token reads the whole KV cache, which is H/G times smaller. For an
encoder-decoder (T5) the context is the encoder's input, whose keys and values fill the decoder's cross-attention
cache; decoding then reads that cache and the decoder's own self-attention cache at every step. Whisper's encoder
takes a fixed window of audio (1,500 positions for 30 s), encoded here from random log-mel features.

Three decode loops, each figure saying which, on which device and with which attention kernel:
- `dynamic`: the eager loop; the cache grows by concatenation at every step.
- `static`: transformers' StaticCache, preallocated for the context plus the decode steps (G heads per layer,
  allocated at the prefill, written in place); the same tokens and logits as `dynamic` (tests check it).
- `static+compile`: the static loop with the decode step compiled by torch.compile (where torch can compile:
  a C++ compiler on CPU), so per-step Python overhead stops hiding the cache's cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gqa_toolkit.families.geometry import check_context, context_length
from gqa_toolkit.families.spec import audio_input
from gqa_toolkit.families.transformers_names import cache_argument, output_cache

from .errors import EvalError

DEFAULT_CONTEXTS = (128, 512)
DECODE_LOOPS = ("dynamic", "static", "static+compile")


def speed_contexts(configs: list, contexts: tuple[int, ...] | None, decode_steps: int) -> tuple[int, ...]:
    """The contexts to measure the models of `configs` (the first the converted one) at, each checked to hold
    the decode steps after it: the given ones, else the defaults within every model's context. An audio encoder
    takes its whole window (whisper: 1,500 positions, 30 s) and nothing else."""
    config = configs[0]
    audio = audio_input(config.model_type)
    if audio is not None:
        window = getattr(config, audio.positions_attr)
        if contexts not in (None, (window,)):
            raise EvalError(f"--contexts {','.join(map(str, contexts))}: this {config.model_type} encodes a fixed "
                            f"window of {window} positions; leave --contexts out or pass --contexts {window}")
        decoder_positions = getattr(config, audio.decoder_positions_attr)
        if decode_steps + 1 > decoder_positions:  # the start token, then the decoded ones
            raise EvalError(f"--decode-steps {decode_steps} is past this {config.model_type} decoder's "
                            f"{decoder_positions} positions; take at most {decoder_positions - 1}")
        contexts = (window,)
    if contexts is None:  # the defaults that fit (or the whole context), so a plain `gqa-eval speed DIR` runs
        limits = [limit for limit in map(context_length, configs) if limit is not None]
        room = min(limits) - decode_steps if limits else None
        contexts = tuple(c for c in DEFAULT_CONTEXTS if room is None or c <= room) or (max(room, 1),)
    for each in configs:
        check_context(each, max(contexts), "--contexts", EvalError, decode_steps)
    return contexts


def _cache_tensors(cache) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    return [t for pair in cache for t in pair]  # legacy tuple of (key, value)


def _decoder_start(model, batch_size: int) -> torch.Tensor:
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    start = start if start is not None else (config.pad_token_id or 0)
    return torch.full((batch_size, 1), start, dtype=torch.long, device=model.device)  # (B, 1)


def context_inputs(model, batch_size: int, context: int) -> dict[str, torch.Tensor]:
    """A random context of `context` positions: token ids (B, T), or for an audio encoder log-mel features
    (B, mel bins, frames) that it encodes to `context` positions."""
    audio = audio_input(model.config.model_type)
    if audio is None:
        return {"input_ids": torch.randint(0, model.config.vocab_size, (batch_size, context), device=model.device)}
    shape = (batch_size, getattr(model.config, audio.mel_bins_attr), context * audio.frames_per_position)
    return {"input_features": torch.randn(shape, dtype=model.dtype, device=model.device)}


def static_cache(model, context: int, decode_steps: int):
    """A StaticCache for `context` positions (an encoder-decoder's encoder positions, in its cross-attention
    cache) and `decode_steps` new tokens; its tensors are allocated at the first write, with the K/V heads (G)
    the model writes, and `reset()` makes it ready for another round."""
    from transformers import EncoderDecoderCache, StaticCache

    config = model.config.get_text_config(decoder=True)
    if not model.config.is_encoder_decoder:
        return StaticCache(config=config, max_cache_len=context + decode_steps)
    return EncoderDecoderCache(StaticCache(config=config, max_cache_len=decode_steps + 1),  # the start token too
                               StaticCache(config=config, max_cache_len=context))


def prefill(model, context: dict[str, torch.Tensor], decoder_ids: torch.Tensor | None = None, cache=None):
    """Run the context (from `context_inputs`) with the cache on (`cache`: one to fill, e.g. a static one);
    returns the output and the extra inputs every decode step needs (an encoder-decoder's encoder output,
    computed once)."""
    given = {} if cache is None else {cache_argument(model): cache}
    if not model.config.is_encoder_decoder:
        return model(**context, **given, use_cache=True), {}
    from transformers.modeling_outputs import BaseModelOutput

    batch_size = len(next(iter(context.values())))
    decoder_ids = _decoder_start(model, batch_size) if decoder_ids is None else decoder_ids
    out = model(**context, decoder_input_ids=decoder_ids, **given, use_cache=True)
    return out, {"encoder_outputs": BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)}


def decode_step(model, next_ids: torch.Tensor, cache, extra: dict, forward=None):
    """One token (B, 1) through the decoder with the cache (`forward`: a compiled model, else the model)."""
    key = "decoder_input_ids" if model.config.is_encoder_decoder else "input_ids"
    run = model if forward is None else forward
    return run(**{key: next_ids, cache_argument(model): cache}, use_cache=True, **extra)


def compiled_forward(model):
    """The model compiled for single-token decode steps of fixed shapes (a static cache). Each model, batch size
    and cache length is a graph of its own: past dynamo's recompile limit (8) it would fall back to eager without
    a word, so the limit is raised."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    setattr(config, limit, max(getattr(config, limit), 256))
    return torch.compile(model, dynamic=False)


def attention_kernel(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in _cache_tensors(cache))


@torch.no_grad()
def kv_cache_bytes_per_token(model, tokens: int = 8) -> float:
    """Bytes the model's own KV cache holds per token, measured from the cache tensors after a prefill. For an
    encoder-decoder, per token of both encoder input and decoder output: the cross-attention cache per encoder
    position plus the self-attention cache per decoded token (whisper encodes its whole audio window)."""
    audio = audio_input(model.config.model_type)
    context = getattr(model.config, audio.positions_attr) if audio else tokens
    decoder_ids = torch.zeros(1, tokens, dtype=torch.long, device=model.device)
    cache = output_cache(prefill(model, context_inputs(model, 1, context), decoder_ids=decoder_ids)[0])
    if not hasattr(cache, "cross_attention_cache"):
        return _bytes(cache) / tokens
    return _bytes(cache.cross_attention_cache) / context + _bytes(cache.self_attention_cache) / tokens


@dataclass(frozen=True)
class SpeedPoint:
    context: int
    batch_size: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_step: float
    decode: str = "dynamic"  # one of DECODE_LOOPS
    device: str = "cpu"
    attention: str = "sdpa"  # transformers' attention kernel the model ran


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


@torch.no_grad()
def measure_speed(model, context: int, batch_size: int, decode_steps: int = 16, repeats: int = 3,
                  decode: str = "dynamic") -> SpeedPoint:
    """Fastest of `repeats` rounds of: prefill `context` tokens, then `decode_steps` single-token steps with the
    cache, in the `decode` loop (DECODE_LOOPS). Other work on the machine only ever adds time, so the fastest round
    is the least disturbed (as timeit)."""
    if decode not in DECODE_LOOPS:
        raise EvalError(f"decode loop {decode!r} is unknown; choose from {', '.join(DECODE_LOOPS)}")
    model.eval()
    device = model.device
    cache = static_cache(model, context, decode_steps) if decode != "dynamic" else None
    forward = compiled_forward(model) if decode == "static+compile" else None
    prefill_s, decode_s = [], []
    for _ in range(repeats + 1):  # the first round warms up allocators and kernels (and compiles)
        if cache is not None:
            cache.reset()
        inputs = context_inputs(model, batch_size, context)
        _sync(device)
        t0 = time.perf_counter()
        out, extra = prefill(model, inputs, cache=cache)
        _sync(device)
        t1 = time.perf_counter()
        step_cache, next_ids = output_cache(out), out.logits[:, -1:].argmax(-1)  # (B, 1)
        for _ in range(decode_steps):
            out = decode_step(model, next_ids, step_cache, extra, forward)
            step_cache, next_ids = output_cache(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    fastest_prefill, fastest_decode = min(prefill_s[1:]), min(decode_s[1:])
    return SpeedPoint(context, batch_size, batch_size * context / fastest_prefill,
                      batch_size * decode_steps / fastest_decode, 1000 * fastest_decode / decode_steps, decode,
                      device_name(device), attention_kernel(model))
