"""The grouped-query attention core of gqa-toolkit's modeling files: H query heads share G key/value heads.

Each family file (`gqa_<family>.py`) subclasses its stock transformers attention together with `GroupedAttention`
and writes one method, `attend`, that says only what the family does differently: how Q, K and V are projected
(fused or separate, biases, scaling), its positions (rotary, T5's relative bias, none) and its output. The core
owns the rest: binding to the stock forward's signature, K/V through the cache with G heads (self-attention appends,
cross-attention computes once and reuses) and the attention function from transformers' registry.

Copied next to the family file into every converted directory; imports torch and transformers only.
"""

from __future__ import annotations

import inspect
import operator
from typing import Callable

import torch
import transformers
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# The names the cache argument of an attention forward has had across transformers releases.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, S, hd) -> (B, G * n_rep, S, hd): KV head j serves query heads j*n_rep .. (j+1)*n_rep - 1."""
    if n_rep == 1:
        return x
    B, G, S, hd = x.shape
    return x[:, :, None].expand(B, G, n_rep, S, hd).reshape(B, G * n_rep, S, hd)


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    position_bias: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scaling + position_bias + mask) V, with each K/V head repeated for its query heads.
    query (B, H, T, hd), key and value (B, G, S, hd) -> (B, T, H, hd) and the weights (B, H, T, S)."""
    key = repeat_kv(key, module.num_key_value_groups)  # (B, H, S, hd)
    value = repeat_kv(value, module.num_key_value_groups)
    if module.upcast_scores:  # scores in float32 even under fp16 autocast, where Q K^T can overflow
        with torch.autocast(query.device.type, enabled=False):
            weights = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling  # (B, H, T, S)
    else:
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if position_bias is not None:
        weights = weights + position_bias
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class StockForward:
    """The stock attention forward's signature, read once when a family class is defined: which name this
    transformers release gives the cache, and whether every other argument is one the family's `attend` takes.
    An argument `attend` does not know is an ImportError, never silently dropped."""

    def __init__(self, forward: Callable, attend: Callable, owner: str):
        self.signature = inspect.signature(forward)  # follows the __wrapped__ of transformers' deprecate_kwarg
        params = list(self.signature.parameters.values())[1:]  # without self
        self.var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        accepted = {p.name for p in inspect.signature(attend).parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [n for n in named if n not in accepted and n not in CACHE_ARGUMENTS]
        if unknown or any(p.kind is p.VAR_POSITIONAL for p in params):
            raise ImportError(f"{forward.__qualname__} in transformers {transformers.__version__} takes "
                              f"{', '.join(unknown) or '*args'}, which {owner} does not know; this transformers "
                              "release is outside the range the modeling file was written for")

    def arguments(self, module: nn.Module, *args, **kwargs) -> dict:
        """The call's arguments by name, with the cache under `cache` whatever name the caller used."""
        bound = self.signature.bind(module, *args, **kwargs).arguments
        bound.pop(next(iter(self.signature.parameters)))
        extra = bound.pop(self.var_keyword, {}) if self.var_keyword else {}
        arguments = {**bound, **extra}
        caches = [c for c in (arguments.pop(name, None) for name in CACHE_ARGUMENTS) if c is not None]
        if len(caches) > 1:
            raise TypeError(f"{type(module).__name__} was given more than one cache argument")
        return {**arguments, "cache": caches[0] if caches else None}


class GroupedModel:
    """Put before a stock model class: builds it, then puts a GroupedAttention in place of each stock attention
    module that `gqa_swaps` names. Each swap is (a dotted path from the model to a list of layers, the dotted path
    from a layer to its attention module, the config attributes holding that attention's KV-head count, the first
    set one counting); `grouped` builds the replacement from the stock module."""

    gqa_swaps: tuple[tuple[str, str, tuple[str, ...]], ...]
    gqa_attention: type

    def __init__(self, config):
        super().__init__(config)
        for layers, attribute, kv_heads_attrs in self.gqa_swaps:
            kv_heads = next((getattr(config, a) for a in kv_heads_attrs if getattr(config, a, None) is not None), None)
            owner_path, _, name = attribute.rpartition(".")
            for i, layer in enumerate(operator.attrgetter(layers)(self)):
                owner = operator.attrgetter(owner_path)(layer) if owner_path else layer
                setattr(owner, name, self.grouped(getattr(owner, name), kv_heads, i))
        self.post_init()

    def grouped(self, stock: nn.Module, num_key_value_heads: int | None, layer_idx: int) -> nn.Module:
        """The GroupedAttention replacing `stock` (decoder-only families: built from the config, which holds G)."""
        return self.gqa_attention(self.config, layer_idx=layer_idx)


class GroupedAttention(nn.Module):
    """Mixed into a stock attention class before it: `class GQAOPTAttention(GroupedAttention, OPTAttention)`."""

    stock_forward: StockForward
    upcast_scores = False  # the eager attention's Q K^T in float32 (GPT-2's reorder_and_upcast_attn)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stock = next(c for c in cls.__mro__ if "forward" in vars(c) and not issubclass(c, GroupedAttention))
        cls.stock_forward = StockForward(stock.forward, cls.attend, f"{cls.__qualname__}.attend")

    def forward(self, hidden_states, *args, **kwargs):
        return self.attend(**self.stock_forward.arguments(self, hidden_states, *args, **kwargs))

    def attend(self, hidden_states, cache=None, **kwargs):
        raise NotImplementedError

    def group_heads(self, num_heads: int, num_key_value_heads: int | None, head_dim: int) -> int:
        """Record the head counts the core and transformers' kernels read; returns the K/V width G * hd."""
        self.num_key_value_heads = num_key_value_heads or num_heads
        if num_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} does not divide the "
                             f"{num_heads} query heads")
        # read by transformers' sdpa and flash attention, which share each K/V head among its query heads
        self.num_key_value_groups = num_heads // self.num_key_value_heads
        self.grouped_head_dim = head_dim
        return self.num_key_value_heads * head_dim

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n * hd) -> (B, n, T, hd)."""
        return x.view(*x.shape[:-1], -1, self.grouped_head_dim).transpose(1, 2)

    def cached_kv(self, cache, project: Callable[[], tuple[torch.Tensor, torch.Tensor]], cross: bool = False):
        """This step's K/V, (B, G, S, hd) each, through the cache: self-attention appends the projected heads;
        cross-attention projects the encoder states once and reads them back at every later step."""
        layer_cache = cache
        if isinstance(cache, EncoderDecoderCache):
            layer_cache = cache.cross_attention_cache if cross else cache.self_attention_cache
            if cross and cache.is_updated.get(self.layer_idx):
                layer = layer_cache.layers[self.layer_idx]
                return layer.keys, layer.values
        key, value = project()
        if layer_cache is not None:
            key, value = layer_cache.update(key, value, self.layer_idx)  # the cache holds G heads
            if cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        return key, value

    def grouped_attention(self, query, key, value, attention_mask, *, scaling: float, dropout: float, **kwargs):
        """query (B, H, T, hd) over key and value (B, G, S, hd) -> (B, T, H * hd) and the attention weights."""
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attention(self, query, key, value, attention_mask, scaling=scaling,
                                 dropout=dropout if self.training else 0.0, **kwargs)
        return out.reshape(*out.shape[:2], -1).contiguous(), weights  # (B, T, H * hd)
