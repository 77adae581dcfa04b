"""Which key transforms commute with a family's rotary embedding, and how to build them.

A key map M (applied to every key of one head, with M^T applied to the queries that read it) leaves every attention
logit unchanged exactly when it commutes with the position rotation. Under HF's `rotate_half` convention dimension i
rotates together with i + r/2 (r the rotary dims); under GPT-J's interleaved one, 2i with 2i + 1. Either pair is one
complex number z = k_re + 1j * k_im, and position t multiplies it by e^{1j t theta_i}. The maps that commute are a
complex scalar per pair (a 2x2 scaled rotation) plus any matrix on the non-rotary dims (partial rotary, or families
with no RoPE). `KeyMap` holds exactly that, so no code path can build a map that breaks RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import ConversionError

if TYPE_CHECKING:
    from .config import ConfigReader
    from .spec import Rope


@dataclass(frozen=True)
class RopeLayout:
    head_dim: int
    rotary_dims: int  # r: dims [0, r) rotate in pairs (i, i + r/2); dims [r, head_dim) are free
    interleaved: bool = False  # the pairs are (2i, 2i + 1) instead

    def __post_init__(self):
        if self.rotary_dims % 2 or not 0 <= self.rotary_dims <= self.head_dim:
            raise ConversionError(f"rotary_dims {self.rotary_dims} must be even and within head_dim "
                                  f"{self.head_dim}")

    @property
    def pairs(self) -> int:
        return self.rotary_dims // 2

    @property
    def free(self) -> int:
        return self.head_dim - self.rotary_dims

    def to_complex(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., hd, n) real head rows -> (..., r/2, n) complex pairs."""
        r = self.rotary_dims
        if self.interleaved:
            return torch.complex(rows[..., 0:r:2, :], rows[..., 1:r:2, :])
        return torch.complex(rows[..., :self.pairs, :], rows[..., self.pairs:r, :])

    def from_complex(self, pairs: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """(..., r/2, n) complex and (..., f, n) real -> (..., hd, n) real head rows."""
        if self.interleaved:
            rotary = torch.stack([pairs.real, pairs.imag], dim=-2).flatten(-3, -2)  # (..., r/2, 2, n) -> (..., r, n)
            return torch.cat([rotary, free], dim=-2)
        return torch.cat([pairs.real, pairs.imag, free], dim=-2)

    def pair_sum(self, per_dim: torch.Tensor) -> torch.Tensor:
        """(..., hd) -> (..., r/2): the two dimensions of each rotary pair added."""
        z = self.to_complex(per_dim[..., None])[..., 0]
        return z.real + z.imag

    def free_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[..., self.rotary_dims:, :]  # (..., f, n)


def rope_layout(rope: Rope, config: ConfigReader, head_dim: int) -> RopeLayout:
    """The layout a config implies: all dims rotate unless a partial factor or a dimension count says otherwise;
    none without RoPE."""
    if rope.style == "none":
        return RopeLayout(head_dim, 0)
    interleaved = rope.style == "interleaved"
    dims = next(((attr, d) for attr, d in ((attr, config.get(attr)) for attr in rope.dims_attrs) if d is not None),
                None)
    if dims is not None:
        attr, value = dims
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= head_dim or value % 2:
            raise ConversionError(f"config.json has {attr}={_short(value)}; expected an even whole number of rotary "
                                  f"dimensions from 0 to the head size {head_dim}: fix it in config.json")
        return RopeLayout(head_dim, value, interleaved)
    factors = ((attr, config.get(attr)) for attr in rope.factor_attrs)
    attr, factor = next(((attr, f) for attr, f in factors if f is not None), (None, 1.0))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= 1:
        raise ConversionError(f"config.json has {attr}={_short(factor)}; expected the fraction of each head's "
                              f"dimensions that rotate, from 0 to 1 (1: all): fix it in config.json")
    return RopeLayout(head_dim, int(head_dim * factor), interleaved)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class KeyMap:
    """Per-head maps that commute with RoPE: k_source ~= M k_shared, and queries become M^T q.

    alpha: (n, r/2) complex scalar per rotary pair; free: (n, f, f) real matrix on the non-rotary dims."""

    alpha: torch.Tensor
    free: torch.Tensor

    @staticmethod
    def identity(n: int, layout: RopeLayout, dtype=torch.float64) -> "KeyMap":
        alpha = torch.ones(n, layout.pairs, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
        return KeyMap(alpha, torch.eye(layout.free, dtype=dtype).expand(n, -1, -1).clone())

    def apply(self, rows: torch.Tensor, layout: RopeLayout) -> torch.Tensor:
        """M rows: (n, hd, c) -> (n, hd, c)."""
        z = self.alpha[:, :, None] * layout.to_complex(rows)  # (n, r/2, c)
        return layout.from_complex(z, self.free @ layout.free_rows(rows))

    def apply_transposed(self, rows: torch.Tensor, layout: RopeLayout) -> torch.Tensor:
        """M^T rows, for the queries: (n, hd, c) -> (n, hd, c). The transpose of a scaled rotation is its
        conjugate."""
        z = self.alpha.conj()[:, :, None] * layout.to_complex(rows)  # (n, r/2, c)
        return layout.from_complex(z, self.free.transpose(1, 2) @ layout.free_rows(rows))

    def index(self, idx) -> "KeyMap":
        return KeyMap(self.alpha[idx], self.free[idx])
