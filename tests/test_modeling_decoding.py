"""Cached decoding of every converted family, native and the toolkit's own, with eager and sdpa attention.

The KV cache is compared with what it must reproduce: each cached step (prefill, then one token at a time, on a
left-padded batch) equals a full forward over the whole sequence so far; greedy `generate()` equals greedy decoding
by full forwards; the cache holds G heads, read from the cache object itself.
"""

import pytest
import torch
import transformers
from conftest import greedy_generate, on_model, on_test_device, skip_without_sdpa, tolerance
from families import FAMILIES, NO_NATIVE_FAMILIES, encoder_inputs

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.families.transformers_names import cache_argument, output_cache

GROUPS_NO_NATIVE = 2
STEPS = 4
CASES = [(f, f.groups, "AutoModelForCausalLM", "family_dirs") for f in FAMILIES]
CASES += [(f, GROUPS_NO_NATIVE, f.auto, "no_native_dirs") for f in NO_NATIVE_FAMILIES]
IMPLEMENTATIONS = ["eager", "sdpa"]


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """family -> its converted directory, converted once per module."""
    out = {}

    def get(family, groups, fixture):
        if family.model_type not in out:
            src = request.getfixturevalue(fixture)[family.model_type]
            out[family.model_type] = convert_checkpoint(src, tmp_path_factory.mktemp(family.model_type) / "out",
                                                        groups=groups, progress=False)
        return out[family.model_type]
    return get


def _key_shapes(cache) -> list[tuple[int, ...]]:
    caches = [cache.self_attention_cache, cache.cross_attention_cache] if hasattr(cache, "cross_attention_cache") \
        else [cache]
    return [tuple(layer.keys.shape) for c in caches for layer in c.layers]


def _prompt(vocab: int, padded: bool):
    ids = torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # the first row is left-padded, as in batched generation
    return ids, mask


class Decoder:
    """Runs one model as a decoder-only LM over a prompt, or as an encoder-decoder over the encoder inputs the prompt
    stands for (its ids and mask, or whisper's audio features), with or without a cache."""

    def __init__(self, model, family):
        self.model, self.family = model, family
        self.seq2seq = model.config.is_encoder_decoder
        self.cache_argument = cache_argument(model)

    def encoder(self, ids, mask) -> dict:
        return encoder_inputs(self.family, ids, mask)

    def full(self, ids, mask, tokens):
        """Logits at the last position of a full forward over prompt + tokens (B, n)."""
        if self.seq2seq:
            return self.run(**self.encoder(ids, mask), decoder_input_ids=tokens).logits[:, -1].float().cpu()
        whole = torch.cat([ids, tokens], 1)
        out = self.run(input_ids=whole, attention_mask=torch.cat([mask, torch.ones_like(tokens)], 1))
        return out.logits[:, -1].float().cpu()

    def run(self, **inputs):
        return self.model(**on_model(self.model, inputs))

    def step(self, ids, mask, tokens, cache):
        """(logits at the last position, cache) from feeding the newest token only (the whole prompt first)."""
        if self.seq2seq:
            inputs = dict(**self.encoder(ids, mask), decoder_input_ids=tokens if cache is None else tokens[:, -1:])
        elif cache is None:
            inputs = dict(input_ids=torch.cat([ids, tokens], 1), attention_mask=mask)
        else:
            inputs = dict(input_ids=tokens[:, -1:], attention_mask=torch.cat([mask, torch.ones_like(tokens)], 1))
        out = self.run(**inputs, use_cache=True, **({self.cache_argument: cache} if cache is not None else {}))
        return out.logits[:, -1].float().cpu(), output_cache(out)


def _load(case, converted, attn_implementation):
    family, groups, auto, fixture = case
    out = converted(family, groups, fixture)
    if attn_implementation == "sdpa":
        skip_without_sdpa(auto, out)
    chosen = {"attn_implementation": attn_implementation} if attn_implementation else {}  # None: the default
    model = getattr(transformers, auto).from_pretrained(out, **chosen)
    model = on_test_device(model).eval()
    cached_heads = model.config.num_attention_heads if getattr(family, "caches_query_heads", False) else groups
    return model, Decoder(model, family), cached_heads


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c[0].model_type for c in CASES])
def test_cached_steps_equal_full_forwards_and_cache_holds_g_heads(case, attn_implementation, converted):
    model, decoder, cached_heads = _load(case, converted, attn_implementation)
    ids, mask = _prompt(model.config.vocab_size, padded=True)
    start = getattr(model.config, "decoder_start_token_id", None)
    tokens = torch.full((2, 1), start, dtype=torch.long) if decoder.seq2seq else ids[:, :0]
    cache, worst = None, 0.0
    with torch.no_grad():
        for _ in range(STEPS):
            cached, cache = decoder.step(ids, mask, tokens, cache)
            full = decoder.full(ids, mask, tokens)
            torch.testing.assert_close(cached, full, **tolerance(rtol=0, atol=1e-5))
            worst = max(worst, (cached - full).abs().max().item())
            tokens = torch.cat([tokens, full.argmax(-1, keepdim=True)], 1)
    shapes = _key_shapes(cache)
    assert shapes and all(s[1] == cached_heads for s in shapes), shapes
    print(f"{case[0].model_type} {attn_implementation}: largest |cached - full| over {STEPS} steps {worst:.2e}")


@pytest.mark.parametrize("case", CASES, ids=[c[0].model_type for c in CASES])
def test_greedy_generate_equals_greedy_full_forwards(case, converted):
    model, decoder, _ = _load(case, converted, None)
    ids, mask = _prompt(model.config.vocab_size, padded=False)
    new = 5
    model.generation_config.eos_token_id = None  # decode all `new` tokens, with no logits processor in the way
    with torch.no_grad():
        prompt = decoder.encoder(ids, mask) if decoder.seq2seq else {"input_ids": ids, "attention_mask": mask}
        generated = greedy_generate(model, **prompt, max_new_tokens=new, pad_token_id=0)
        if decoder.seq2seq:
            tokens = torch.full((2, 1), model.config.decoder_start_token_id, dtype=torch.long)
        else:
            tokens = ids[:, :0]
        for _ in range(new):
            full = decoder.full(ids, mask, tokens)
            tokens = torch.cat([tokens, full.argmax(-1, keepdim=True)], 1)
    expected = tokens if decoder.seq2seq else torch.cat([ids, tokens], 1)
    assert torch.equal(generated, expected)
