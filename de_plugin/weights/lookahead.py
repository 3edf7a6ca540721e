"""A finalist scored one round further (``de_layerwise``'s ``selection_lookahead``).

A round's selection compares allocations at that round's sparsity only. Layers pruned in one round are never
given weights back in a later one, so an allocation that recovers best now can leave the next round nothing
that recovers: on a digits ViT at 95% sparsity (3 rounds) the rounds to 63% and 86% took the allocations that
recovered best after their short fine-tunes, and every candidate of the last round then fell to 30-37%
validation accuracy; the model ended at 74.5% test against LAMP's 89.0% (BENCHMARKS.md, "A vision transformer
the defaults never saw"). The look-ahead prunes the finalist's retrained weights on to the next round's keep
the two ways the next round's search starts from (the finalist's own shape scaled, and LAMP on its weights)
and scores the better, without training: what the next round can start from.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..evaluation.batchnorm import recalibrate_bn
from ..search.budget import fit_budget
from ..targets import Target, get_param
from .allocation import lamp, masks_from_counts
from .rounds import density_schedule


def next_keep(keep: int, keep_final: int, rounds_after: int) -> Optional[int]:
    """The next round's keep-count on the runner's geometric schedule (equal compression per round), from this
    round's ``keep`` with ``rounds_after`` rounds still to come; None after the last round."""
    if rounds_after <= 0 or keep <= keep_final:
        return None
    return int(round(density_schedule(keep, keep_final, rounds_after)[0]))  # the runner's rule, from here on


def next_round_score(model: nn.Module, targets: Sequence[Target], counts: np.ndarray, keep: int,
                     min_keep: np.ndarray, score: Callable[[], float],
                     calib: Optional[Sequence] = None) -> float:
    """The better score of the model's current weights pruned further to ``keep`` weights by the finalist's own
    shape (``counts`` scaled) and by LAMP, each kept within ``counts`` per layer (a later round cannot grow a
    layer). ``calib``: BatchNorm re-estimated on these batches before each score (adaptive BN, as the search
    scores). The weights are put back on return; re-estimated BN statistics are the caller's to restore
    (:class:`RetrainedMeasure` restores every buffer)."""
    params = [get_param(model, t) for t in targets]
    saved = [p.detach().clone() for p in params]
    numels = np.array([t.numel for t in targets], dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    best = -np.inf
    for density in (counts / numels, lamp(saved, 1.0 - keep / int(numels.sum())) / numels):
        plan = fit_budget(density, numels, keep, np.minimum(min_keep, counts), upper=counts)
        with torch.no_grad():
            for p, w, m in zip(params, saved, masks_from_counts(saved, plan)):
                torch.mul(w, m, out=p)
        if calib:
            recalibrate_bn(model, calib, len(calib))
        best = max(best, float(score()))
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    return best
