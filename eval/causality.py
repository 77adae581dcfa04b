"""Perplexity of a next-token predictor means something only if its prediction at position t sees no token after
t: an encoder loaded with a causal-LM head (bert's) sees them all and scores far too well."""

from __future__ import annotations

import torch

from .errors import EvalError


def check_causal(model, role: str, tokens: int = 8) -> None:
    """Refuse a decoder-only model whose logits at earlier positions change when only the last token does."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return  # scored on targets through the decoder, whose causal mask transformers applies
    vocab = getattr(config, "vocab_size", None) or 2
    device = next(model.parameters()).device
    ids = (torch.arange(tokens, device=device) * 7 + 3) % vocab  # (T,)
    changed = ids.clone()
    changed[-1] = (ids[-1] + 1) % vocab
    with torch.no_grad():
        logits = model(input_ids=torch.stack([ids, changed])).logits.float()  # (2, T, V)
    # a causal model's earlier rows are the same computation in both sequences: equal but for rounding, while the
    # last row, which saw the changed token, moves; an encoder's earlier rows move with it
    earlier = float((logits[0, :-1] - logits[1, :-1]).abs().max())
    last = float((logits[0, -1] - logits[1, -1]).abs().max())
    if earlier > max(1e-3 * last, 1e-6 * float(logits.abs().max())):
        raise EvalError(f"{role} ({config.model_type}) sees the tokens after each position: its predictions change "
                        "when only a later token does, so it is not a causal language model and its perplexity "
                        "would mean nothing; measure a decoder")
