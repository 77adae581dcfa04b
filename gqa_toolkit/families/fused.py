"""Fused q/k/v layouts: split one fused tensor into per-head q, k, v and fuse them back.

Every function works on the leading (output-row) axis and keeps any trailing axes, so the same code serves a
weight `[rows, d]` and a bias `[rows]`. Split returns q `(H, hd, *rest)`, k and v `(G, hd, *rest)`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..errors import ConversionError


class Heads(NamedTuple):
    q: torch.Tensor  # (H, hd, *rest)
    k: torch.Tensor  # (G, hd, *rest)
    v: torch.Tensor  # (G, hd, *rest)


class FusedLayout(NamedTuple):
    rows: Callable[[int, int, int], int]  # (H, G, hd) -> leading size of the fused tensor
    split: Callable[[torch.Tensor, int, int, int], Heads]
    fuse: Callable[[Heads], torch.Tensor]


def _concat_rows(H: int, G: int, hd: int) -> int:
    return (H + 2 * G) * hd


def _concat_split(t: torch.Tensor, H: int, G: int, hd: int) -> Heads:
    # rows [q (H*hd) | k (G*hd) | v (G*hd)]: phi3 qkv_proj, gpt_bigcode c_attn with multi_query
    q, k, v = t.split([H * hd, G * hd, G * hd], dim=0)
    rest = t.shape[1:]
    return Heads(q.reshape(H, hd, *rest), k.reshape(G, hd, *rest), v.reshape(G, hd, *rest))


def _concat_fuse(h: Heads) -> torch.Tensor:
    return torch.cat([x.flatten(0, 1) for x in h], dim=0)


def _per_head_rows(H: int, G: int, hd: int) -> int:
    if G != H:
        raise ConversionError(f"the per-head fused layout holds one K/V head per query head, not {G} for {H}")
    return 3 * H * hd


def _per_head_split(t: torch.Tensor, H: int, G: int, hd: int) -> Heads:
    # rows [H, (q, k, v), hd]: gpt_bigcode c_attn without multi_query, gpt_neox query_key_value
    _per_head_rows(H, G, hd)
    per_head = t.reshape(H, 3, hd, *t.shape[1:])  # (H, 3, hd, *rest)
    return Heads(per_head[:, 0], per_head[:, 1], per_head[:, 2])


def _per_head_fuse(h: Heads) -> torch.Tensor:
    return torch.stack(list(h), dim=1).flatten(0, 2)  # (H, 3, hd, *rest) -> (H*3*hd, *rest)


def _grouped_rows(H: int, G: int, hd: int) -> int:
    return (H + 2 * G) * hd


def _grouped_split(t: torch.Tensor, H: int, G: int, hd: int) -> Heads:
    # rows [G, (q * H/G, k, v), hd]: falcon's new_decoder_architecture
    rest = t.shape[1:]
    grouped = t.reshape(G, H // G + 2, hd, *rest)  # (G, H/G + 2, hd, *rest)
    q = grouped[:, :-2].reshape(H, hd, *rest)
    return Heads(q, grouped[:, -2], grouped[:, -1])


def _grouped_fuse(h: Heads) -> torch.Tensor:
    G = h.k.shape[0]
    H, hd, rest = h.q.shape[0], h.q.shape[1], h.q.shape[2:]
    q = h.q.reshape(G, H // G, hd, *rest)  # (G, H/G, hd, *rest)
    grouped = torch.cat([q, h.k.unsqueeze(1), h.v.unsqueeze(1)], dim=1)  # (G, H/G + 2, hd, *rest)
    return grouped.flatten(0, 2)


FUSED_LAYOUTS: dict[str, FusedLayout] = {
    "q|k|v": FusedLayout(_concat_rows, _concat_split, _concat_fuse),
    "per_head": FusedLayout(_per_head_rows, _per_head_split, _per_head_fuse),
    "grouped": FusedLayout(_grouped_rows, _grouped_split, _grouped_fuse),
}


def fused_layout(name: str) -> FusedLayout:
    if name not in FUSED_LAYOUTS:
        raise KeyError(f"unknown fused layout {name!r}; known: {', '.join(FUSED_LAYOUTS)}")
    return FUSED_LAYOUTS[name]
