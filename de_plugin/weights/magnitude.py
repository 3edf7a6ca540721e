"""``de_layerwise``'s scorer: a keep-count vector per layer becomes magnitude masks on the working copy,
the model is scored (adaptive BN, early rejection), the weights are put back."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..evaluation.batches import REJECT_MARGIN, Bound, DeviceBatches, check_score, inference
from ..evaluation.batchnorm import BNState, recalibrate_bn
from ..metrics import accuracy
from ..targets import Target, get_param
from .allocation import keep_mask, magnitude_rank


class MagnitudeScorer:
    """Magnitude masks from keep-counts, applied in place to one model and scored.

    Per searched weight it holds the round's fp32 snapshot and, unless ``low_memory``, an int32
    magnitude rank (masks by one comparison). ``low_memory`` drops the ranks (masks by an O(n)
    selection per changed layer, :func:`keep_mask`: the same masks) and takes the snapshot at the
    first candidate rather than at the round's start, so the round's seeds (LAMP's scores) are not
    held at the same time."""

    #: the batched backend may stack this scorer's masked weights (vmap over candidates)
    batchable = True

    def stacked_masks(self, layer: int, keeps: Sequence[int]) -> torch.Tensor:
        """One layer's masks for several keep-counts, stacked on a new leading dim (the batched backend's)."""
        w0 = self.w0[layer]
        if self.rank is None:  # low-memory mode: one selection per candidate
            return torch.stack([keep_mask(w0, int(k)) for k in keeps])
        rank = self.rank[layer]
        keep = torch.tensor([int(k) for k in keeps], device=rank.device)
        return rank.unsqueeze(0) < keep.view(-1, *([1] * rank.dim()))


    def __init__(self, model: nn.Module, targets: Sequence[Target], evaluate: Callable[[nn.Module], float],
                 batches: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
                 metric: Optional[Callable] = None, calib: Optional[Sequence[Any]] = None, bn_batches: int = 0,
                 search_batches: Optional[int] = None, low_memory: bool = False):
        self.model, self.targets, self.evaluate = model, list(targets), evaluate
        self.low_memory = low_memory
        self._w0: Optional[list[torch.Tensor]] = None
        self._scratch: Optional[torch.Tensor] = None
        self._ready = False
        # multi-fidelity: the search scores accuracy on the first ``search_batches`` batches only
        # (needs ``batches``); :meth:`score_full` gives the full score for the final re-scoring
        self.search_batches = search_batches
        # adaptive BN: re-estimate BatchNorm statistics on ``bn_batches`` of ``calib`` before scoring
        self.calib = list(calib)[:bn_batches] if calib is not None and bn_batches > 0 else None
        self.bn_state: Optional[BNState] = None
        # early rejection needs a score that is a per-image sum: accuracy on the cached batches
        # (``evaluate`` is then ``evaluator_from_batches(batches, accuracy)``, which this mirrors)
        self.batches = None
        if batches is not None and metric is accuracy and len(batches) > 1:
            shared = getattr(evaluate, "batches", None)  # the evaluator's own (device) copies
            self.batches = shared if isinstance(shared, DeviceBatches) else DeviceBatches(batches)
        self.metric = metric
        self.rank: Optional[list[torch.Tensor]] = None  # built by reset(), once per round

    def reset(self) -> None:
        """Take the model's current weights as this round's reference: a snapshot and each weight's
        magnitude rank (built once per round, shared with the round's mask computation); in
        low-memory mode no ranks, and the snapshot waits for the first candidate (:attr:`w0`)."""
        self.params = [get_param(self.model, t) for t in self.targets]
        self._w0 = None if self.low_memory else [p.detach().clone() for p in self.params]
        self.rank = None if self.low_memory else [magnitude_rank(w) for w in self._w0]
        self._keep = torch.empty(max(p.numel() for p in self.params), dtype=torch.bool, device=self.params[0].device)
        # keep_mask's two work buffers (low-memory mode), 8 bytes per weight of the largest layer: held only
        # when that layer is under a tenth of the searched weights (else they would weigh on the peak)
        big = self._keep.numel()
        self._scratch = torch.empty(2 * big, device=self.params[0].device, dtype=self.params[0].dtype) \
            if self.low_memory and 10 * big < sum(p.numel() for p in self.params) else None
        self.applied: list[Optional[int]] = [None] * len(self.params)
        self.bn_state = BNState(self.model) if self.calib else None
        self._ready = True

    @property
    def w0(self) -> list[torch.Tensor]:
        """The round's weights (in low-memory mode taken at first use, before any mask is applied)."""
        if not self._ready:
            self.reset()
        if self._w0 is None:
            self._w0 = [p.detach().clone() for p in self.params]
        return self._w0

    def apply(self, counts: Sequence[int]) -> None:
        """Keep the ``counts[l]`` largest weights of each layer: one vectorised pass per changed layer
        (``rank < k``, or :func:`keep_mask` in low-memory mode), exactly the first ``k`` of the stable
        descending magnitude order."""
        w0 = self.w0
        with torch.no_grad():
            for i, (p, k) in enumerate(zip(self.params, counts)):
                k = int(k)
                if self.applied[i] != k:
                    keep = self._keep[: p.numel()].view(p.shape)  # one bool buffer, reused by every layer
                    if self.rank is None:
                        keep_mask(w0[i], k, out=keep, scratch=self._scratch)
                    else:
                        torch.lt(self.rank[i], k, out=keep)
                    torch.mul(w0[i], keep, out=p)
                    self.applied[i] = k

    def restore(self) -> None:
        if not self._ready:
            return
        with torch.no_grad():
            for p, w in zip(self.params, self._w0 or []):
                p.copy_(w)
        self.applied = [None] * len(self.params)
        if self.bn_state is not None:
            self.bn_state.restore()

    def release(self) -> None:
        """Drop the round's snapshot and ranks (taken again by the next :meth:`reset` or candidate)."""
        self._w0, self.rank, self._scratch, self._ready = None, None, None, False

    def _prepare(self, counts: Sequence[int]) -> None:
        """The candidate's masks applied and, with adaptive BN, its BatchNorm statistics re-estimated."""
        self.apply(counts)
        if self.bn_state is not None:
            recalibrate_bn(self.model, self.calib, len(self.calib))

    def score(self, counts: Sequence[int], floor: Optional[float] = None) -> float:
        """The candidate's score, or a :class:`Bound` below ``floor`` when it cannot reach it."""
        self._prepare(counts)
        if self.search_batches is not None and self.batches is not None:
            return self._bounded(floor if floor is not None and np.isfinite(floor) else -math.inf, self.search_batches)
        if floor is None or self.batches is None or not np.isfinite(floor):
            return check_score(self.evaluate(self.model))
        return self._bounded(floor)

    def score_full(self, counts: Sequence[int]) -> float:
        """The candidate's exact score on all of the validation data (the multi-fidelity re-score)."""
        self._prepare(counts)
        return check_score(self.evaluate(self.model))

    def score_holdout(self, counts: Sequence[int]) -> float:
        """The candidate's accuracy on the validation batches the search did not score on (those after
        the first ``search_batches``); all of them when the search scored on all."""
        self._prepare(counts)
        return self.holdout_now()

    def holdout_now(self) -> float:
        """The model's accuracy as it is now on the held-out validation batches (all when none are held out)."""
        if self.batches is None or self.search_batches is None or self.search_batches >= len(self.batches):
            return check_score(self.evaluate(self.model))
        data, labels = self.batches.on(next(self.model.parameters()).device)
        held = data[self.search_batches:]
        with inference(self.model):
            preds = torch.cat([self.model(x).argmax(1) for x, _ in held])
        return float((preds == labels[len(labels) - len(preds):]).float().mean())

    def _bounded(self, floor: float, n_batches: Optional[int] = None) -> float:
        """Accuracy batch by batch (over the first ``n_batches``, all by default); stop once
        ``(correct so far + images left) / total < floor``. A candidate that is not rejected gets
        exactly what ``evaluate`` computes on those batches (same predictions, the same float32 mean),
        so serial, worker and rejecting runs stay bit-identical."""
        model = self.model
        data, labels = self.batches.on(next(model.parameters()).device)
        if n_batches is not None:
            data = data[:n_batches]
            labels = labels[: sum(len(y) for _, y in data)]
        total = len(labels)
        preds, seen, correct = [], 0, 0
        with inference(model):
            for x, y in data:
                pred = model(x).argmax(1)
                preds.append(pred)
                seen += len(y)
                correct += int((pred == y).sum())
                upper = (correct + total - seen) / total
                if seen < total and upper < floor - REJECT_MARGIN:
                    return Bound(upper, total - seen)
        return check_score(float((torch.cat(preds) == labels).float().mean()))  # exactly metrics.accuracy
