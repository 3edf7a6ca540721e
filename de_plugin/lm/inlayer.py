"""The mask inside one layer at a given keep-count, without retraining: magnitude, Wanda, SparseGPT.

Every method works on an ``[out, in]`` weight and prunes *exactly* the asked number of weights, so a
searched allocation's global budget holds to the weight:

* ``magnitude``: the smallest ``|W|`` in the whole layer.
* ``wanda``: the smallest ``|W_ij| * ||X_j||_2`` in each output row (Sun et al. 2023, "A Simple and
  Effective Pruning Approach for LLMs"); a count that does not divide by the rows is met by pruning one
  more weight in the rows whose next candidate scores lowest.
* ``sparsegpt``: OBS-style pruning with reconstruction (Frantar & Alistarh 2023): columns in blocks of
  128, within each block the weights with the smallest ``w^2 / [H^-1]_jj^2`` are pruned and the error is
  spread over the columns not yet processed through the Cholesky factor of ``H^-1`` (1% damping). The
  prune count is split over the column blocks in proportion to their width (largest remainder).

N:M (``nm=(2, 4)``): in every group of M consecutive inputs of a row, the N lowest-scoring weights go
(magnitude / Wanda scores; SparseGPT chooses them inside its column loop, as in the paper).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

METHODS = ("magnitude", "wanda", "sparsegpt")


def layer_mask(scores: torch.Tensor, prune: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keep-mask pruning the ``prune`` lowest scores of the whole tensor (``order``: the scores'
    stable ascending argsort, when the caller holds it already)."""
    if prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    order = torch.argsort(scores.flatten(), stable=True) if order is None else order
    return flat_keep(order, prune, scores.shape)


def flat_keep(order: torch.Tensor, prune: int, shape: torch.Size) -> torch.Tensor:
    """:func:`layer_mask` from the flat ascending order alone (int32 or int64)."""
    keep = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
    if prune > 0:
        keep[order[:prune]] = False
    return keep.view(shape)


def row_mask(scores: torch.Tensor, prune: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keep-mask pruning ``prune`` weights spread evenly over the rows, lowest scores within each row
    (``order``: the rows' stable ascending argsort, when the caller holds it already)."""
    order = torch.argsort(scores, dim=1, stable=True) if order is None else order
    return rows_keep(order, prune, lambda idx: scores.gather(1, idx))


def rows_keep(order: torch.Tensor, prune: int, score_at: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """:func:`row_mask` from each row's ascending order (int32 or int64) and ``score_at(idx)``, the scores at
    column indices ``idx`` ``[rows, 1]``: each row loses its ``prune // rows`` lowest, and the rows whose next
    weight scores lowest one more, so the count is exact. Only those scores are read, so a caller that holds
    the orders need not hold the scores."""
    rows, cols = order.shape
    base, extra = divmod(int(prune), rows)
    keep = torch.ones((rows, cols), dtype=torch.bool, device=order.device)
    if base:
        keep.scatter_(1, order[:, :base].long(), False)
    if extra:
        nxt = order[:, base].long()
        lowest = torch.argsort(score_at(nxt[:, None]).squeeze(1), stable=True)[:extra]
        keep[lowest, nxt[lowest]] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask pruning the ``n`` lowest scores in every group of ``m`` consecutive inputs."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.topk(groups, n, dim=2, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, drop, False)
    return keep.reshape(rows, cols)


def check_nm(nm: Optional[tuple[int, int]], in_features: int, name: str) -> None:
    if nm is None:
        return
    n, m = nm
    if not (0 < n < m):
        raise ValueError(f"nm=({n}, {m}) must prune N of every M with 0 < N < M, e.g. (2, 4)")
    if in_features % m:
        raise ValueError(f"{n}:{m} sparsity needs the input width divisible by {m}; layer {name} has "
                         f"{in_features} inputs. Leave this layer out (exclude=...) or use unstructured sparsity")


def scores_for(method: str, w: torch.Tensor, norms: Optional[torch.Tensor]) -> torch.Tensor:
    """Magnitude or Wanda importance of an ``[out, in]`` weight."""
    if method == "wanda":
        return w.abs() * norms.to(w.dtype)[None, :]
    return w.abs()


def prune_weight(method: str, w: torch.Tensor, prune: int, *, norms: Optional[torch.Tensor] = None,
                 hessian: Optional[torch.Tensor] = None, nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``w`` (``[out, in]``) with exactly ``prune`` weights zeroed (or N:M) by ``method``; a new tensor."""
    if method == "sparsegpt":
        return sparsegpt(w, hessian, prune, nm=nm)
    s = scores_for(method, w.float(), norms)
    if nm is not None:
        keep = nm_mask(s, *nm)
    else:
        keep = row_mask(s, prune) if method == "wanda" else layer_mask(s, prune)
    return w * keep.to(w.dtype)


def _block_counts(cols: int, blocksize: int, prune: int, rows: int) -> list[int]:
    widths = np.array([min(blocksize, cols - i) for i in range(0, cols, blocksize)], dtype=float)
    real = prune * widths / widths.sum()
    k = np.floor(real).astype(int)
    for i in np.argsort(-(real - k), kind="stable")[: prune - int(k.sum())]:
        k[i] += 1
    return [int(min(v, w * rows)) for v, w in zip(k, widths.astype(int))]


@torch.no_grad()
def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, prune: int, *, nm: Optional[tuple[int, int]] = None,
              blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's reconstruction (the reference algorithm), pruning exactly ``prune`` weights (or N:M)."""
    if hessian is None:
        raise ValueError("sparsegpt needs the layer's input Hessian (collect_stats(..., hessians=True))")
    W = w.detach().clone().float()
    rows, cols = W.shape
    H = hessian.to(W.device, torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    counts = _block_counts(cols, blocksize, prune, rows) if nm is None else None
    for bi, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            mask1 = ~layer_mask(W1 ** 2 / d[None, :] ** 2, counts[bi])
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm[0], dim=1, largest=False).indices, True)
            q = W1[:, i].clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (W1[:, i] - q) / d[i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)
