"""Each layer's pruned weights at any keep-count, prepared once so a candidate costs one forward pass.

The search scores hundreds of allocations; re-running the in-layer method for each would cost more
than the forward pass that scores it. As in EvoPress, what can be computed per layer once is:

* magnitude and Wanda: the score order (one stable sort per layer, per row for Wanda); the mask at
  any count is then a slice of it, identical to :func:`~de_plugin.lm.inlayer.prune_weight`'s.
* SparseGPT, whose reconstructed weights depend on the level: weights at discrete sparsity levels
  (``level_step`` apart), each computed the first time a candidate asks for it and kept. A candidate's
  count is scored at the nearest level; the final model is pruned at the exact counts.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .calibration import LayerStats, collect_stats
from .inlayer import flat_keep, prune_weight, rows_keep, scores_for
from .targets import LMLayer


class LayerDatabase:
    """Pruned ``[out, in]`` weights of ``layers`` by keep-count for one in-layer ``method``."""

    def __init__(self, layers: Sequence[LMLayer], stats: LayerStats, method: str,
                 nm: Optional[tuple[int, int]] = None, level_step: float = 0.05):
        self.layers, self.stats, self.method, self.nm, self.level_step = list(layers), stats, method, nm, level_step
        self.dense = [l.weight.detach().clone() for l in self.layers]
        self.levels: dict[tuple[int, int], torch.Tensor] = {}
        self.orders: list[Optional[torch.Tensor]] = [None] * len(self.layers)

    def _order(self, i: int) -> torch.Tensor:
        """Layer i's ascending score order (per row for Wanda), int32 where it fits: 4 bytes a weight, and no
        scores kept (a Wanda mask reads one score per row, recomputed)."""
        if self.orders[i] is None:
            s = scores_for(self.method, self.dense[i].float(), self.stats.norms(i))
            order = (torch.argsort(s, dim=1, stable=True) if self.method == "wanda"
                     else torch.argsort(s.flatten(), stable=True))
            del s
            self.orders[i] = order.to(torch.int32) if order.numel() < 2 ** 31 else order
        return self.orders[i]

    def _score_at(self, i: int, idx: torch.Tensor) -> torch.Tensor:
        """Layer i's Wanda scores at column indices ``idx`` ``[rows, k]`` (the values :func:`scores_for` gives)."""
        norms = self.stats.norms(i).to(torch.float32)
        return self.dense[i].gather(1, idx).float().abs() * norms[idx]

    def level(self, i: int, keep: int) -> int:
        """SparseGPT: the prune count of the level nearest to keeping ``keep`` weights."""
        n = self.dense[i].numel()
        step = max(1, round(self.level_step * n))
        return min(n, int(round((n - int(keep)) / step)) * step)

    def exact(self, i: int, keep: int) -> torch.Tensor:
        """Layer i pruned directly at exactly ``keep`` weights (the final model's weights)."""
        w = self.dense[i]
        prune = w.numel() - int(keep)
        h = self.stats.hessians[i] if self.stats.hessians is not None else None
        return prune_weight(self.method, w, prune, norms=self.stats.norms(i), hessian=h, nm=self.nm)

    def weight(self, i: int, keep: int) -> torch.Tensor:
        """Layer i's weights for a candidate keeping ``keep`` (SparseGPT: at the nearest level)."""
        w = self.dense[i]
        if self.nm is not None:
            if (i, -1) not in self.levels:
                self.levels[(i, -1)] = self.exact(i, w.numel() // self.nm[1] * (self.nm[1] - self.nm[0]))
            return self.levels[(i, -1)]
        if self.method == "sparsegpt":
            prune = self.level(i, keep)
            if (i, prune) not in self.levels:
                self.levels[(i, prune)] = self.exact(i, w.numel() - prune)
            return self.levels[(i, prune)]
        order = self._order(i)
        prune = w.numel() - int(keep)
        keep_mask = (rows_keep(order, prune, lambda idx: self._score_at(i, idx)) if self.method == "wanda"
                     else flat_keep(order, prune, w.shape))
        return w * keep_mask.to(w.dtype)

    def apply(self, counts: Sequence[int], exact: bool = False) -> None:
        """Write every layer's weights for ``counts`` into the model (``exact``: the final pruning)."""
        for i, (l, k) in enumerate(zip(self.layers, counts)):
            l.set_weight(self.exact(i, int(k)) if exact and self.nm is None else self.weight(i, int(k)))

    def restore(self) -> None:
        for l, w in zip(self.layers, self.dense):
            l.set_weight(w)


@torch.no_grad()
def prune_sequential(model: torch.nn.Module, layers: Sequence[LMLayer], batches: Sequence[torch.Tensor],
                     method: str, counts: Sequence[int], nm: Optional[tuple[int, int]] = None) -> None:
    """Prune ``layers`` to ``counts`` block by block, in block order, as the SparseGPT and Wanda papers do:
    each block's input statistics come from a pass over ``batches`` through the blocks before it *as
    pruned*, so a block's mask (and SparseGPT's reconstruction) corrects for the error the earlier blocks
    left instead of assuming dense inputs. Costs one partial forward pass per block (each pass ends
    at the block's last target layer). ``layers`` must hold their dense weights on entry."""
    for b in sorted({l.block for l in layers}):
        idx = [i for i, l in enumerate(layers) if l.block == b]
        stats = collect_stats(model, [layers[i] for i in idx], batches, hessians=method == "sparsegpt",
                              stop_early=True)
        for j, i in enumerate(idx):
            w = layers[i].weight.detach().clone()
            h = stats.hessians[j] if stats.hessians is not None else None
            layers[i].set_weight(prune_weight(method, w, w.numel() - int(counts[i]), norms=stats.norms(j),
                                              hessian=h, nm=nm))


class SequentialPruning:
    """The final pruning done block by block (:func:`prune_sequential`), with the database's ``apply`` /
    ``restore`` so the seeds and the searched allocation are measured the same way."""

    def __init__(self, db: LayerDatabase, model: torch.nn.Module, batches: Sequence[torch.Tensor]):
        self.db, self.model, self.batches = db, model, list(batches)

    def apply(self, counts: Sequence[int], exact: bool = True) -> None:
        self.db.restore()
        prune_sequential(self.model, self.db.layers, self.batches, self.db.method, counts, self.db.nm)

    def restore(self) -> None:
        self.db.restore()
