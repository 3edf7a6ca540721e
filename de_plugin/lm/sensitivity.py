"""A per-layer allocation from the loss's curvature: what pruning each layer to each level would cost.

Why: uniform and OWL weigh no layer by what its pruning costs the model's output (on TinyGPT at 70% the
searched allocation prunes the MLP down-projections far harder than either). This allocation does, for
the price of a few backward passes and no search: 0.92-0.99x OWL's held-out perplexity on the 4-block
TinyGPT, but 1.01-1.25x on a 6-block one, where the independent-layer estimate misses how errors compound
through depth. As an extra start for the search it did not help (``fisher_seed``, off by default).

The cost is Optimal Brain Damage's second-order estimate of the KL divergence a change ``dW`` causes,
``KL ~ 1/2 sum_j F_j dW_j^2``, with ``F`` the diagonal Fisher information of the model's own next-token
distribution (labels drawn from the dense model, so each position's gradient has mean zero and the
squared gradient of a batch's summed loss estimates the sum of per-position squared gradients without
one backward pass per position). ``dW`` is ``-W`` on the weights the in-layer method removes (its mask
at that count, from the database). SparseGPT's update of the weights it keeps is left out: it exists to
cancel the removed weights' effect on the layer's output, which a diagonal Fisher cannot see, so counting
it would charge SparseGPT's most-reconstructed layers as the most damaged (on TinyGPT at 70%, counting it
gives 1.14x OWL's held-out perplexity, leaving it out 0.99x). Each layer's cost is tabulated
at a grid of keep-counts, and the allocation minimising the summed cost under the exact global budget
is found by a Lagrange multiplier (bisection), then fitted to the budget. Layers are treated as
independent: the search that follows corrects for how their errors compound.

:class:`TaylorGuide` makes the same expansion at a pruned allocation instead of the dense model, with the
KL's gradient there as the first-order term, and does not allocate: it ranks the guided search's level
switches, whose exact scores then decide (``search_strategy='guided'``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..search.budget import fit_budget
from .calibration import logits_of
from .targets import LMLayer

#: backward passes cost about this many forward passes (the search's evaluations are forward passes)
BACKWARD_COST = 3


def fisher_diagonal(model: nn.Module, layers: Sequence[LMLayer], batches: Sequence[torch.Tensor],
                    seed: int = 0) -> list[torch.Tensor]:
    """Each target's diagonal Fisher ``[out, in]`` per token, from one backward pass per batch with
    next tokens drawn from the model's own distribution."""
    weights = [l.module.weight for l in layers]
    fisher = [torch.zeros_like(l.weight, dtype=torch.float32) for l in layers]
    gen = _generator(weights[0].device if weights else torch.device("cpu"), seed)
    tokens = 0
    with _grads_on(weights):
        for b in batches:
            logits = logits_of(model, b).float()
            with torch.no_grad():
                probs = F.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
                drawn = (torch.multinomial(probs, 1, generator=gen) if gen.device == probs.device else
                         torch.multinomial(probs.cpu(), 1, generator=gen).to(probs.device)).squeeze(1)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), drawn, reduction="sum")
            grads = torch.autograd.grad(loss, weights)
            for f, g, l in zip(fisher, grads, layers):
                g = g.t() if l.transposed else g
                f += g.float() ** 2
            tokens += drawn.numel()
    return [f / tokens for f in fisher]


@contextmanager
def _grads_on(weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """The target weights require gradients inside (a user's frozen model included), as they did after."""
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device``, or on the CPU for a device that has none of its own (e.g. torch's
    lazy tensors; the draws are then made from the probabilities copied to the CPU)."""
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:
        return torch.Generator().manual_seed(seed)


def cost_table(db, fisher: Sequence[torch.Tensor], grid: np.ndarray) -> np.ndarray:
    """``[layers, grid]``: layer i's estimated KL when it keeps ``grid[i, g]`` weights (alone): half the
    Fisher-weighted squares of the weights its mask removes."""
    out = np.zeros(grid.shape, dtype=float)
    for i, f in enumerate(fisher):
        dense = db.dense[i].float()
        for g, keep in enumerate(grid[i]):
            pruned = db.weight(i, int(keep)) == 0
            out[i, g] = 0.5 * float((f * dense * dense)[pruned].sum())
    return out


def fisher_counts(db, fisher: Sequence[torch.Tensor], numels: np.ndarray, budget: int, min_keep: np.ndarray,
                  max_keep: np.ndarray, points: int = 41) -> np.ndarray:
    """Keep-counts minimising the summed per-layer cost with exactly ``budget`` weights kept."""
    grid = np.stack([np.linspace(lo, hi, points).round().astype(np.int64) for lo, hi in zip(min_keep, max_keep)])
    cost = cost_table(db, fisher, grid)

    def chosen(lam: float) -> np.ndarray:
        return grid[np.arange(len(grid)), np.argmin(cost + lam * grid, axis=1)]

    lo, hi = 0.0, 1.0
    while chosen(hi).sum() > budget:  # a price per kept weight high enough to keep within the budget
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if chosen(mid).sum() > budget else (lo, mid)
    counts = chosen(lo)
    return fit_budget(counts / numels, numels, budget, min_keep, max_keep)


def kl_gradient(model: nn.Module, layers: Sequence[LMLayer], ref, upto: int) -> list[torch.Tensor]:
    """Each target's gradient ``[out, in]`` of the mean KL divergence from the dense model (``ref``, a
    :class:`~de_plugin.lm.fitness.DenseReference`) on its first ``upto`` batches, at the weights the model holds."""
    weights = [l.module.weight for l in layers]
    grads = [torch.zeros_like(l.weight, dtype=torch.float32) for l in layers]
    rows = list(zip(ref.batches, ref.logp))[:upto]
    tokens = sum(lp.shape[0] * lp.shape[1] for _, lp in rows)
    with _grads_on(weights):
        for b, lp in rows:
            lq = F.log_softmax(logits_of(model, b).float(), dim=-1).to(lp.device)
            kl = (lp.exp() * (lp - lq)).sum() / tokens
            for a, g, l in zip(grads, torch.autograd.grad(kl, weights), layers):
                a += (g.t() if l.transposed else g).float().to(a.device)
    return grads


class TaylorGuide:
    """The estimate ``search_strategy='guided'`` ranks its moves by (a :class:`~de_plugin.search.allocator.Guide`):
    the change in KL divergence when one layer of the parent allocation keeps another count, to second order,
    ``dKL ~ g . dW + 1/2 sum_j F_j dW_j^2``, with ``g`` the KL's gradient at the parent (one backward pass per
    search batch, remade for every new parent: it sees the errors the other layers' pruning left, which the
    ``fisher`` allocation's estimate at the dense model cannot) and ``F`` the dense model's diagonal Fisher
    (once). ``dW`` is ``-W`` on the weights the in-layer method removes next and ``+W`` on those it gives back
    (magnitude and Wanda: read from a cumulative sum along each layer's score order, so every count costs
    nothing more); with SparseGPT the difference of the database's weights at the two levels."""

    def __init__(self, model: nn.Module, layers: Sequence[LMLayer], db, ref, upto: int, seed: int = 0):
        self.model, self.layers, self.db, self.ref, self.upto = model, list(layers), db, ref, upto
        self.fisher = fisher_diagonal(model, self.layers, ref.batches[:upto], seed=seed)
        self.cost = BACKWARD_COST
        self.made = 0  # estimates made (each ``cost`` evaluations)

    def estimate(self, counts: np.ndarray):
        """``change(layer, count)``: the predicted fitness change (minus the KL's) of layer ``layer`` of
        ``counts`` keeping ``count``."""
        try:
            self.db.apply(counts)
            grads = kl_gradient(self.model, self.layers, self.ref, self.upto)
            # the parent's masks as applied (a dense zero is neither: its terms are zero either way)
            kept = [l.weight != 0 for l in self.layers] if self.db.method != "sparsegpt" else None
        finally:
            self.db.restore()
        self.made += 1
        if kept is None:
            return self._levels(counts, grads)
        profiles = [self._profile(i, int(k), g, m) for i, (k, g, m) in enumerate(zip(counts, grads, kept))]

        def change(i: int, keep: int) -> float:
            xs, ys, p0, s0 = profiles[i]
            p = self.db.dense[i].numel() - int(keep)
            s = float(np.interp(p, xs, ys))
            return -((s - s0) if p >= p0 else (s0 - s))
        return change

    def _profile(self, i: int, keep: int, g: torch.Tensor,
                 kept: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Layer i's cumulative second-order cost along its removal order (prune counts ``xs``, costs ``ys``):
        a weight the parent keeps (``kept``) costs its removal, one it prunes its restoration."""
        w = self.db.dense[i].float()
        curv = 0.5 * self.fisher[i] * w * w
        cost = torch.where(kept, curv - g * w, curv + g * w)
        order = self.db._order(i).long()
        if self.db.method == "wanda":  # every row loses the same share: a prune count spreads over the rows
            rows, cols = w.shape
            ys = torch.cumsum(cost.gather(1, order), 1).sum(0)
            xs = np.arange(cols + 1) * rows
        else:
            ys = torch.cumsum(cost.flatten()[order], 0)
            xs = np.arange(w.numel() + 1)
        ys = np.r_[0.0, ys.double().cpu().numpy()]  # the weights' device (a GPU) to the host: one vector a layer
        p0 = w.numel() - keep
        return xs, ys, p0, float(np.interp(p0, xs, ys))

    def _levels(self, counts: np.ndarray, grads: list[torch.Tensor]):
        def change(i: int, keep: int) -> float:
            dw = (self.db.weight(i, keep) - self.db.weight(i, int(counts[i]))).float()
            return -float((grads[i] * dw).sum() + 0.5 * (self.fisher[i] * dw * dw).sum())
        return change
