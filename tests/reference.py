"""An independent reference for a conversion: the stock MHA model with each group's K/V heads replaced by their
mean (or first head) and duplicated to every head of the group. It edits modules of a loaded transformers model
and never touches the converter's code, so agreement with the converted checkpoint is evidence, not tautology.
"""

from __future__ import annotations

import torch


def _tie_groups(t: torch.Tensor, kv_heads: int, groups: int, method: str) -> torch.Tensor:
    """t has kv_heads blocks along dim 0; each group's blocks become its mean (or first block), duplicated."""
    blocks = t.reshape(groups, kv_heads // groups, -1)  # (G, G0/G, block)
    shared = blocks.mean(1, keepdim=True) if method == "mean" else blocks[:, :1]
    return shared.expand_as(blocks).reshape(t.shape).clone()


def _tie_rows_in_place(param: torch.Tensor, kv_heads: int, groups: int, method: str) -> None:
    param.copy_(_tie_groups(param, kv_heads, groups, method))


def _separate(attn, kv_heads, groups, method, kv_norm):
    for proj in (attn.k_proj, attn.v_proj):
        _tie_rows_in_place(proj.weight, kv_heads, groups, method)
        if proj.bias is not None:
            _tie_rows_in_place(proj.bias, kv_heads, groups, method)
    if kv_norm in ("olmo2", "cohere"):
        _tie_rows_in_place(attn.k_norm.weight, kv_heads, groups, method)
    if kv_norm == "stablelm":
        stacked = torch.stack([n.weight for n in attn.k_layernorm.norms])  # (G0, hd)
        tied = _tie_groups(stacked, kv_heads, groups, method)
        for i, norm in enumerate(attn.k_layernorm.norms):
            norm.weight.copy_(tied[i])


def _phi3(attn, kv_heads, groups, method, heads, hd):
    w = attn.qkv_proj.weight  # rows [q (H*hd) | k (G0*hd) | v (G0*hd)]
    q_rows = heads * hd
    for start in (q_rows, q_rows + kv_heads * hd):
        _tie_rows_in_place(w[start:start + kv_heads * hd], kv_heads, groups, method)


def _falcon(attn, kv_heads, groups, method, heads, hd):
    for param in (attn.query_key_value.weight, attn.query_key_value.bias):
        if param is None:
            continue
        grouped = param.view(kv_heads, heads // kv_heads + 2, hd, -1)  # (G0, H/G0 + 2, hd, in)
        for slot in (-2, -1):
            _tie_rows_in_place(grouped[:, slot], kv_heads, groups, method)


def _bigcode(attn, kv_heads, groups, method, heads, hd):
    for param in (attn.c_attn.weight, attn.c_attn.bias):
        per_head = param.view(heads, 3, hd, -1)  # (H, q/k/v, hd, in)
        for slot in (1, 2):
            _tie_rows_in_place(per_head[:, slot], kv_heads, groups, method)


def _attention_modules(model):
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("self_attn", "self_attention", "attn")]


def apply_reference(model, family, groups: int, method: str) -> None:
    """Tie K/V heads in place within each group of the stock model."""
    cfg = model.config
    heads = cfg.num_attention_heads
    if getattr(cfg, "new_decoder_architecture", False):
        kv_heads = cfg.num_kv_heads
    elif cfg.model_type == "gpt_bigcode":  # its saved num_key_value_heads is stale; multi_query is what counts
        kv_heads = 1 if cfg.multi_query else heads
    else:
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    with torch.no_grad():
        for attn in _attention_modules(model):
            if family.kv_access == "separate":
                _separate(attn, kv_heads, groups, method, family.kv_norm)
            else:
                {"phi3": _phi3, "falcon": _falcon, "bigcode": _bigcode}[family.kv_access](
                    attn, kv_heads, groups, method, heads, hd)


def _tie_columns_in_place(param: torch.Tensor, kv_heads: int, groups: int, method: str) -> None:
    """For Conv1D weights `[in, out]`: the head blocks run along the last axis."""
    param.T.copy_(_tie_groups(param.T, kv_heads, groups, method))


def _no_native_attention(model, model_type: str, scope: str):
    """(module, how) for every attention module the conversion touches, found by the stock module layout."""
    if model_type == "t5":
        found = [(b.layer[0].SelfAttention, "t5") for b in model.decoder.block]
        found += [(b.layer[1].EncDecAttention, "t5") for b in model.decoder.block]
        if scope == "all":
            found += [(b.layer[0].SelfAttention, "t5") for b in model.encoder.block]
        return found
    if model_type == "gpt_neox":
        return [(layer.attention, "gpt_neox") for layer in model.gpt_neox.layers]
    if model_type == "bloom":  # query_key_value per head, as gpt_neox's
        return [(block.self_attention, "gpt_neox") for block in model.transformer.h]
    if model_type == "gpt2":
        return [(block.attn, "gpt2") for block in model.transformer.h]
    if model_type == "opt":
        return [(layer.self_attn, "opt") for layer in model.model.decoder.layers]
    if model_type == "gptj":  # separate q/k/v/out projections, no biases
        return [(block.attn, "opt") for block in model.transformer.h]
    if model_type in ("bart", "mbart", "marian", "whisper"):  # separate q/k/v/out projections, as opt's
        found = [(layer.self_attn, "opt") for layer in model.model.decoder.layers]
        found += [(layer.encoder_attn, "opt") for layer in model.model.decoder.layers]
        if scope == "all":
            found += [(layer.self_attn, "opt") for layer in model.model.encoder.layers]
        return found
    raise KeyError(model_type)


def apply_reference_no_native(model, model_type: str, groups: int, method: str, scope: str = "decoder") -> None:
    """Tie K/V heads within each group of a stock t5, gpt_neox, gpt2 or opt (MHA) model, in place."""
    cfg = model.config
    heads = getattr(cfg, "decoder_attention_heads", None) or cfg.num_attention_heads  # whisper's maps to the encoder
    d = cfg.hidden_size
    with torch.no_grad():
        for attn, how in _no_native_attention(model, model_type, scope):
            if how == "t5":  # k, v: Linear [H * d_kv, d_model], no bias
                for proj in (attn.k, attn.v):
                    _tie_rows_in_place(proj.weight, heads, groups, method)
            elif how == "opt":
                _separate(attn, heads, groups, method, None)
            elif how == "gpt_neox":  # query_key_value rows [H, (q, k, v), hd]
                hd = d // heads
                for param in (attn.query_key_value.weight, attn.query_key_value.bias):
                    if param is None:
                        continue
                    per_head = param.view(heads, 3, hd, -1)  # (H, q/k/v, hd, in)
                    for slot in (1, 2):
                        _tie_rows_in_place(per_head[:, slot], heads, groups, method)
            elif how == "gpt2":  # c_attn Conv1D weight [d, 3d], columns [q | k | v]; bias [3d]
                w, b = attn.c_attn.weight, attn.c_attn.bias
                for start in (d, 2 * d):
                    _tie_columns_in_place(w[:, start:start + d], heads, groups, method)
                    _tie_rows_in_place(b[start:start + d], heads, groups, method)
