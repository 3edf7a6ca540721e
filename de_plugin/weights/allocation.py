"""Per-layer budget allocations: how many weights each layer keeps for an overall sparsity.

Every allocation returns integer keep-counts whose sum is exactly ``round(N * (1 - sparsity))``
(N = weights of the pruned layers), so "sparsity" means the same number for every method.
Used by the baseline pruners and to seed the DE population.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..registry import registered_allocations
from ..search.budget import largest_remainder, total_keep


def _topk_counts(scores: list[torch.Tensor], total: int) -> np.ndarray:
    """How many of the ``total`` largest scores (non-negative floats) fall in each layer.

    The threshold is found by bisection over float32 bit patterns (monotone for non-negative
    floats, 32 steps), counting per layer: no concatenation and no top-k index tensor, so the
    memory beyond the scores is one layer's boolean mask. Ties at the threshold go to the
    earlier layers.
    """
    counts = np.zeros(len(scores), dtype=np.int64)
    numels = np.array([s.numel() for s in scores], dtype=np.int64)
    if total <= 0:
        return counts
    if total >= numels.sum():
        return numels
    flat = [s.reshape(-1).float() for s in scores]

    def at_least(bits: int) -> int:
        t = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
        return sum(int((s >= t).sum()) for s in flat)

    lo, hi = 0, 0x7F800000  # +0.0 .. +inf
    while lo < hi:  # the largest threshold that still keeps at least `total` scores
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at_least(mid) >= total else (lo, mid - 1)
    t = torch.tensor(lo, dtype=torch.int32).view(torch.float32)
    counts[:] = [int((s > t).sum()) for s in flat]
    left = total - int(counts.sum())
    for i, s in enumerate(flat):  # the tied scores at the threshold, in layer order
        take = min(left, int((s == t).sum()))
        counts[i] += take
        left -= take
    return counts


def uniform(weights: list[torch.Tensor], sparsity: float, ranks: Sequence[torch.Tensor] | None = None,
            ) -> np.ndarray:
    """Same sparsity in every layer."""
    n = np.array([w.numel() for w in weights])
    return largest_remainder(n * (1.0 - sparsity), total_keep(n, sparsity), np.zeros_like(n), n)


def global_magnitude(weights: list[torch.Tensor], sparsity: float, ranks: Sequence[torch.Tensor] | None = None,
                     ) -> np.ndarray:
    """One magnitude threshold over all layers."""
    return _topk_counts([w.detach().abs().float() for w in weights], total_keep([w.numel() for w in weights], sparsity))


def lamp_scores(w: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
    """LAMP (Lee et al. 2021): w_u^2 / sum of w_v^2 over the layer's weights at least as large.

    ``rank`` (``magnitude_rank(w)``, the search's) replaces the sort: weight j sits at
    ascending position ``n - 1 - rank[j]``. Tied weights may then swap scores with each other, which
    leaves the layer's multiset of scores, hence every top-k count, unchanged.
    """
    sq = w.detach().float().reshape(-1) ** 2
    if rank is None:
        order = torch.argsort(sq, stable=True)  # ascending
        s = sq[order]
    else:
        pos = (sq.numel() - 1) - rank.reshape(-1).long()
        s = torch.empty_like(sq)
        s[pos] = sq
    suffix = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])
    scores = s / suffix.clamp_min(1e-30)
    if rank is not None:
        return scores[pos]
    out = torch.empty_like(sq)
    out[order] = scores
    return out


def lamp(weights: list[torch.Tensor], sparsity: float, ranks: Sequence[torch.Tensor] | None = None) -> np.ndarray:
    """Global top-k on LAMP scores (search-free, layer-adaptive); ``ranks`` spare the per-layer sorts."""
    ranks = ranks if ranks is not None else [None] * len(weights)
    return _topk_counts([lamp_scores(w, r) for w, r in zip(weights, ranks)],
                        total_keep([w.numel() for w in weights], sparsity))


def erk(weights: list[torch.Tensor], sparsity: float, ranks: Sequence[torch.Tensor] | None = None,
        ) -> np.ndarray:
    """Erdos-Renyi-Kernel (Evci et al. 2020): density proportional to sum(dims) / prod(dims)."""
    n = np.array([w.numel() for w in weights], dtype=float)
    raw = np.array([sum(w.shape) / float(np.prod(w.shape)) for w in weights])
    total = total_keep(n.astype(int), sparsity)
    dense = np.zeros(len(weights), dtype=bool)
    while True:  # layers whose density would exceed 1 are kept dense; the rest share the budget
        rest = total - n[dense].sum()
        eps = rest / max((raw * n)[~dense].sum(), 1e-30)
        d = np.where(dense, 1.0, eps * raw)
        over = (~dense) & (d > 1.0)
        if not over.any():
            break
        dense |= over
    ni = n.astype(np.int64)
    return largest_remainder(d * n, total, np.zeros_like(ni), ni)


ALLOCATIONS = {
    "uniform_magnitude": uniform,
    "global_magnitude": global_magnitude,
    "lamp": lamp,
    "erk": erk,
}


def rules() -> dict:
    """Every allocation rule by name: the built-in ones, then those plugins registered."""
    return {**ALLOCATIONS, **{k: v for k, v in registered_allocations().items() if k not in ALLOCATIONS}}


def magnitude_rank(w: torch.Tensor) -> torch.Tensor:
    """Each weight's position in its layer's magnitude order (0 = largest; ties by position, as a
    stable descending sort), int32 and shaped like ``w``: keeping ``rank < k`` keeps exactly the
    ``k`` weights ``masks_from_counts`` keeps, with 4 bytes per weight instead of an int64 order."""
    flat = w.detach().abs().reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty(flat.numel(), dtype=torch.int32, device=w.device)
    rank[order] = torch.arange(flat.numel(), dtype=torch.int32, device=w.device)
    return rank.view(w.shape)


def keep_mask(w: torch.Tensor, k: int, out: Optional[torch.Tensor] = None,
              scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``magnitude_rank(w) < k`` without a sort or a rank tensor: the ``k`` largest magnitudes, ties
    at the threshold kept by position (the stable descending order's tie-break), so the mask is the
    same bit for bit. One selection (O(n)) instead of an O(n log n) sort, and no per-weight state:
    how the low-memory search applies candidates. ``scratch`` (1-D, ``w``'s dtype, at least
    ``2 * w.numel()`` long, reused across calls) spares two allocations per call, whose page
    faults cost as much as the selection itself on large layers."""
    out = torch.empty(w.shape, dtype=torch.bool, device=w.device) if out is None else out
    n, k = w.numel(), int(k)
    if k <= 0 or k >= n:
        return out.fill_(k >= n)
    if scratch is None or scratch.numel() < 2 * n or scratch.dtype != w.dtype or scratch.device != w.device:
        scratch = torch.empty(2 * n, dtype=w.dtype, device=w.device)
    a = torch.abs(w.detach().reshape(-1), out=scratch[:n])
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        sel = scratch[n:2 * n].copy_(a).numpy()  # numpy's introselect, in place on the copy
        sel.partition(n - k)
        t = torch.tensor(sel[n - k], dtype=a.dtype)
    else:
        t = torch.kthvalue(a.float(), n - k + 1).values.to(a.dtype)
    flat = out.view(-1)
    torch.gt(a, t, out=flat)
    need = k - int(torch.count_nonzero(flat))
    tied = a == t
    if int(torch.count_nonzero(tied)) != need:  # keep only the first `need` tied weights, as the stable order does
        tied &= torch.cumsum(tied, 0, dtype=torch.int32) <= need
    flat |= tied
    return out


def masks_from_counts(weights: list[torch.Tensor], counts: Sequence[int],
                      ranks: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Keep the ``k`` largest-magnitude weights of each layer (stable tie-break by position).

    ``ranks`` (:func:`magnitude_rank` of these very weights, e.g. the search's) spare the sort.
    """
    if ranks is not None:
        return [(r < int(k)).cpu() for r, k in zip(ranks, counts)]
    return [keep_mask(w, int(k)).cpu() for w, k in zip(weights, counts)]
