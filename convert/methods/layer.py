"""The layer-level API: convert one attention layer's q, k, v, o weights, from any attention implementation.

    from gqa_toolkit.convert.methods.layer import AttentionWeights, convert_layer
    from gqa_toolkit.families.rope import RopeLayout
    new = convert_layer(AttentionWeights(q=Wq, k=Wk, v=Wv, o=Wo), heads=32, kv_heads=32, groups=8,
                        method="aligned", rope=RopeLayout(head_dim=128, rotary_dims=128))

Weights are in nn.Linear's layout: q `[H*hd, d]`, k and v `[G0*hd, d]`, o `[d_out, H*hd]`, head-major; query head
h reads KV head h // (H/G0). Steps: optional similarity grouping (a permutation of KV heads that moves their query
rows and output columns along, so it alone changes nothing), then the method (any registered per-head method, or
a layer method such as `aligned` or `fit` that also returns Q and O changes), then optional norm preservation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConversionError
from gqa_toolkit.families.rope import KeyMap, RopeLayout
from .grouping import similarity_permutation
from .layer_types import PerHeadWeights, InputMoments, LayerContext, LayerResult
from .layer_attention import LayerAttention
from .per_head import pool_heads, preserve_norms
from .refinement import AttentionCalls, RefineSettings, refine, resolve_precision
from .registry import MethodContext, check_method, layer_methods

__all__ = ["AttentionWeights", "InputMoments", "RopeLayout", "convert_layer"]


@dataclass(frozen=True)
class AttentionWeights:
    q: torch.Tensor  # (H*hd, d)
    k: torch.Tensor  # (G*hd, d)
    v: torch.Tensor  # (G*hd, d)
    o: torch.Tensor  # (d_out, H*hd); o's bias never changes, so it is not here
    q_bias: torch.Tensor | None = None  # (H*hd,)
    k_bias: torch.Tensor | None = None  # (G*hd,)
    v_bias: torch.Tensor | None = None  # (G*hd,)


def _check(w: AttentionWeights, heads: int, kv_heads: int, groups: int, rope: RopeLayout) -> int:
    hd = w.q.shape[0] // heads
    problems = []
    if w.q.shape[0] != heads * hd or (w.o.shape[1] != heads * hd):
        problems.append(f"q {list(w.q.shape)} and o {list(w.o.shape)} do not hold {heads} heads")
    for name in ("k", "v"):
        if getattr(w, name).shape[0] != kv_heads * hd:
            problems.append(f"{name} {list(getattr(w, name).shape)} does not hold {kv_heads} heads of {hd}")
    if rope.head_dim != hd:
        problems.append(f"rope.head_dim {rope.head_dim} but the weights have head_dim {hd}")
    if heads % kv_heads or kv_heads % groups or groups < 1:
        problems.append(f"groups {groups} must divide kv_heads {kv_heads}, which must divide heads {heads}")
    if problems:
        raise ConversionError("convert_layer: " + "; ".join(problems))
    return hd


def _per_head_method(name: str, per_head: PerHeadWeights, groups: int, ctx: LayerContext) -> LayerResult:
    """A registered per-head method (mean, first, random) on weight and bias separately, as the per-tensor path
    does; its maps are the identity."""
    def pool(part: str, heads: torch.Tensor) -> torch.Tensor:
        weight, bias = per_head.split_bias(heads, part)  # (G0, hd, d), (G0, hd) or None
        out_w = pool_heads(weight, groups, name, MethodContext(ctx.names.get(f"{part}.weight", part), "normal",
                                                               ctx.init_std, ctx.seed))
        if bias is None:
            return out_w
        out_b = pool_heads(bias, groups, name, MethodContext(ctx.names.get(f"{part}.bias", part), "zeros",
                                                             ctx.init_std, ctx.seed))
        return torch.cat([out_w, out_b[..., None]], dim=-1)  # (G, hd, d + 1)

    G0, hd = per_head.k.shape[0], per_head.k.shape[1]
    eye = torch.eye(hd, dtype=per_head.v.dtype).expand(G0, -1, -1)
    return LayerResult(pool("k", per_head.k), KeyMap.identity(G0, ctx.layout), pool("v", per_head.v), eye)


def _moments(calibration: torch.Tensor | InputMoments | None) -> InputMoments | None:
    return InputMoments.from_inputs(calibration) if isinstance(calibration, torch.Tensor) else calibration


def _checked_per_head(weights: AttentionWeights, heads: int, kv_heads: int, groups: int, rope: RopeLayout | None):
    """The layer's heads after its shapes are checked, and the RoPE layout (None: every dim rotates)."""
    hd = weights.q.shape[0] // heads
    rope = rope or RopeLayout(hd, hd)
    _check(weights, heads, kv_heads, groups, rope)
    return PerHeadWeights.from_weights(weights, heads, kv_heads), rope


def _weights(tensors: dict[str, torch.Tensor | None], dtype: torch.dtype) -> AttentionWeights:
    return AttentionWeights(**{k: (v.to(dtype) if v is not None else None) for k, v in tensors.items()})


def convert_layer(weights: AttentionWeights, *, heads: int, kv_heads: int, groups: int, method: str = "mean",
                  rope: RopeLayout | None = None, grouping: str = "contiguous", preserve_norm: bool = False,
                  calibration: torch.Tensor | InputMoments | None = None,
                  key_calibration: torch.Tensor | InputMoments | None = None, seed: int = 0, init_std: float = 0.02,
                  names: dict[str, str] | None = None, refine_steps: int = 0, refine_lr: float = 0.01,
                  refine_precision: str = "auto", causal: bool = True,
                  rope_theta: float = 10000.0) -> AttentionWeights:
    """One layer's attention converted from `kv_heads` to `groups` KV heads; returns weights in the input's dtype.

    rope: which key dimensions rotate (None: every dim, `RopeLayout(hd, hd)`; `RopeLayout(hd, 0)` for no RoPE).
    calibration: the layer's attention inputs `(N, d)` (normed hidden states) or their `InputMoments`; with them
    grouping, alignment and fitting weigh errors by the real activations instead of the raw weights.
    key_calibration: K's and V's inputs where they are not Q's (cross-attention: the encoder's states).
    refine_steps: then train K/V, Q and O so that standard attention's output (causal or not, RoPE at `rope_theta`
    on `rope`'s rotary dims) matches the source's on `calibration` given as sequences `(B, T, d)` (and
    `key_calibration` `(B, S, d_k)`), `refine_lr` Adam's step relative to each tensor's RMS, `refine_precision`
    its steps' arithmetic (bf16 autocast, fp32, or auto: bf16 where the calibration's device multiplies bf16 in
    hardware)."""
    check_method(method, grouping, preserve_norm)
    device = calibration.device if isinstance(calibration, torch.Tensor) else torch.device("cpu")
    bf16 = resolve_precision(refine_precision, device) == "bf16"
    if refine_steps and not (isinstance(calibration, torch.Tensor) and calibration.dim() == 3):
        raise ConversionError("convert_layer: refine_steps trains on the attention inputs as sequences; give "
                              "calibration as a (batch, tokens, d) tensor")
    per_head, rope = _checked_per_head(weights, heads, kv_heads, groups, rope)
    inputs = dict(moments=_moments(calibration), key_moments=_moments(key_calibration))
    ctx = LayerContext.build(per_head, rope, **inputs, seed=seed, init_std=init_std, names=names or {})
    if grouping == "similarity" and groups < kv_heads:
        per_head = per_head.permuted(similarity_permutation(per_head, groups, ctx, aligned=method in layer_methods()))
        ctx = LayerContext.build(per_head, rope, **inputs, seed=seed, init_std=init_std, names=names or {})
    if method in layer_methods():
        result = layer_methods()[method](per_head, groups, ctx)
    else:
        result = _per_head_method(method, per_head, groups, ctx)
    if preserve_norm:
        result = replace(result, k=preserve_norms(per_head.k, result.k, groups, ctx.metric_k),
                         v=preserve_norms(per_head.v, result.v, groups, ctx.metric_v))
    converted = per_head.assembled(result, rope)
    if refine_steps:
        converted = _refined(weights, converted, heads, kv_heads, groups, rope, calibration, key_calibration,
                             RefineSettings(refine_steps, refine_lr, bf16), causal, rope_theta)
    return _weights(converted, weights.q.dtype)


def _refined(weights: AttentionWeights, converted: dict, heads: int, kv_heads: int, groups: int, rope: RopeLayout,
             inputs: torch.Tensor, keys: torch.Tensor | None, settings: RefineSettings, causal: bool,
             theta: float) -> dict[str, torch.Tensor | None]:
    """`converted` refined against standard attention with the source's weights on the calibration sequences."""
    source = AttentionWeights(**{k: (v.float() if v is not None else None) for k, v in vars(weights).items()})
    module = LayerAttention(source, heads, kv_heads, rope, causal=causal, theta=theta)
    hd, share = rope.head_dim, kv_heads // groups

    def to_source(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        def repeat(x: torch.Tensor) -> torch.Tensor:  # (G*hd, ...) -> (G0*hd, ...), group j for its source heads
            return x.reshape(groups, hd, *x.shape[1:]).repeat_interleave(share, 0).flatten(0, 1)
        return {name: repeat(x) if name[0] in "kv" else x for name, x in t.items()}

    chunks = range(0, len(inputs), 8)
    calls = [((inputs[i:i + 8].float(),), {"keys": keys[i:i + 8].float() if keys is not None else None})
             for i in chunks]
    names = {f"{role[0]}.{'bias' if role.endswith('bias') else 'weight'}": role
             for role, t in converted.items() if t is not None}
    trained = {role: t.float() for role, t in converted.items() if t is not None}
    refined = refine(trained, AttentionCalls(module, names, calls), settings, to_source).tensors
    return {role: refined.get(role) for role in converted}


def align_layer(weights: AttentionWeights, *, heads: int, kv_heads: int, groups: int,
                rope: RopeLayout | None = None, calibration: torch.Tensor | InputMoments | None = None,
                key_calibration: torch.Tensor | InputMoments | None = None) -> AttentionWeights:
    """Alignment alone: every KV head rotated into its group's common basis (keys by RoPE-commuting rotations
    folded into their queries, values by orthogonal maps folded into the output), none merged. The function is
    unchanged; `convert_layer(method="aligned")` then averages the aligned heads."""
    from .alignment import rotated_heads

    per_head, rope = _checked_per_head(weights, heads, kv_heads, groups, rope)
    ctx = LayerContext.build(per_head, rope, _moments(calibration), key_moments=_moments(key_calibration), seed=0,
                             init_std=0.02, names={})
    return _weights(per_head.assembled(rotated_heads(per_head, groups, ctx), rope), weights.q.dtype)


def permute_layer(weights: AttentionWeights, *, heads: int, kv_heads: int, order: list[int]) -> AttentionWeights:
    """KV head `order[p]` moved to position p, with its query heads and their output columns: the same function.
    Similarity grouping is this permutation followed by contiguous grouping."""
    if sorted(order) != list(range(kv_heads)):
        raise ConversionError(f"order {order} is not a permutation of the {kv_heads} KV heads")
    hd = weights.q.shape[0] // heads
    per_head = PerHeadWeights.from_weights(weights, heads, kv_heads).permuted(list(order))
    identity = LayerResult(per_head.k, KeyMap.identity(kv_heads, RopeLayout(hd, hd)), per_head.v,
                           torch.eye(hd, dtype=torch.float64).expand(kv_heads, -1, -1))
    out = per_head.assembled(identity, RopeLayout(hd, hd))
    return AttentionWeights(**{k: (v.to(weights.q.dtype) if v is not None else None) for k, v in out.items()})
