"""Which KV heads share a group: `contiguous` (head j joins group j // (G0/G), the repeat_kv convention) or
`similarity` (equal-size groups of the most alike heads).

Similarity is measured on the heads' weights, or on their K/V activations when calibration moments are given
(||W_a - W_b||_C with C the input second moment). For layer methods that rotate heads before merging it is
measured after the best rotation between the two heads. The grouping is then a permutation of KV heads (with
their query heads and output columns, see PerHeadWeights.permuted), so it alone leaves the model's function unchanged.
"""

from __future__ import annotations

import torch


def _plain_distances(x: torch.Tensor) -> torch.Tensor:
    """x `(G0, ...)` -> squared distances `(G0, G0)`, scaled by the mean squared head norm."""
    f = x.flatten(1)
    return torch.cdist(f, f).square() / f.square().sum(1).mean().clamp_min(1e-30)


def _rotated_distances(x: torch.Tensor) -> torch.Tensor:
    """min over orthogonal M of ||x_a - M x_b||^2 = |a|^2 + |b|^2 - 2 ||x_a x_b^T||_*, x `(G0, m, c)`."""
    sq = x.square().sum((1, 2))  # (G0,)
    nuclear = torch.linalg.matrix_norm(x[:, None] @ x[None].transpose(-1, -2), ord="nuc")  # (G0, G0)
    return (sq[:, None] + sq[None] - 2 * nuclear).clamp_min(0) / sq.mean().clamp_min(1e-30)


def _phase_distances(z: torch.Tensor) -> torch.Tensor:
    """min over one phase per pair of ||z_a - e^{i phi} z_b||^2, z `(G0, P, c)` complex."""
    sq = z.abs().square().sum((1, 2))  # (G0,)
    inner = torch.einsum("apc,bpc->abp", z, z.conj()).abs().sum(-1)  # (G0, G0)
    return (sq[:, None] + sq[None] - 2 * inner).clamp_min(0) / sq.mean().clamp_min(1e-30)


def head_distances(per_head, ctx, aligned: bool) -> torch.Tensor:
    """`(G0, G0)`: how much merging two KV heads would lose, keys and values counted alike."""
    km, vm = per_head.k @ ctx.metric_k, per_head.v @ ctx.metric_v  # (G0, hd, c)
    if not aligned:
        return _plain_distances(km) + _plain_distances(vm)
    layout = ctx.layout
    keys = 0
    if layout.pairs:
        keys = keys + _phase_distances(layout.to_complex(km))
    if layout.free:
        keys = keys + _rotated_distances(layout.free_rows(km))
    return keys + _rotated_distances(vm)


def _cost(d: torch.Tensor, group: list[int]) -> float:
    idx = torch.tensor(group)
    return d[idx][:, idx].sum().item() / 2


def balanced_groups(d: torch.Tensor, groups: int) -> list[list[int]]:
    """Equal-size groups minimising the sum of within-group distances: greedy seeding, then pairwise swaps."""
    G0 = d.shape[0]
    size = G0 // groups
    left = list(range(G0))
    parts: list[list[int]] = []
    while left:
        part = [left.pop(0)]
        while len(part) < size:
            best = min(left, key=lambda j: sum(d[j, i].item() for i in part))
            part.append(best)
            left.remove(best)
        parts.append(part)
    for _ in range(100):  # local search: apply the best improving swap until none improves
        best_gain, best_swap = 1e-12, None
        for a in range(groups):
            for b in range(a + 1, groups):
                base = _cost(d, parts[a]) + _cost(d, parts[b])
                for i in parts[a]:
                    for j in parts[b]:
                        pa = [j if x == i else x for x in parts[a]]
                        pb = [i if x == j else x for x in parts[b]]
                        gain = base - _cost(d, pa) - _cost(d, pb)
                        if gain > best_gain:
                            best_gain, best_swap = gain, (a, b, pa, pb)
        if best_swap is None:
            break
        a, b, pa, pb = best_swap
        parts[a], parts[b] = pa, pb
    return sorted(sorted(p) for p in parts)


def similarity_permutation(per_head, groups: int, ctx, aligned: bool) -> list[int]:
    """The KV head order that puts each similarity group in contiguous positions."""
    return [j for part in balanced_groups(head_distances(per_head, ctx, aligned), groups) for j in part]
