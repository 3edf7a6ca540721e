"""Choosing a round's allocation among finalists by a short fine-tune (``de_layerwise``, ``de_channel``).

A search ranks candidates by a score taken before any training; the user keeps the accuracy after
fine-tuning. Over sampled allocations of four models at 90% and 95% sparsity, the accuracy after the
first tenth of a fine-tune ranked candidates most like the final outcome (Spearman 0.81-0.96 in six
of eight cells, the best of 13 scores in four), while no un-retrained score (accuracy, loss, KL to the
dense outputs, with or without adaptive BN) passed 0.69 on the ViT (BENCHMARKS.md, "Which fitness
predicts the outcome"). Both pruners therefore share one measure for their finalists: apply
the candidate, retrain it briefly with the user's ``finetune``, score, put the weights back. Its cost
(finalists retrained, their epochs, seconds) is recorded in the round's history.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..evaluation import check_score
from ..evaluation.batchnorm import recalibrate_bn

log = logging.getLogger("de_plugin")


class _Enough(BaseException):
    """Raised inside the model's forward once a capped retraining has had its batches (a BaseException,
    like KeyboardInterrupt, so that a training loop's ``except Exception`` does not swallow it)."""


def capped(finetune: Callable[[nn.Module, int], None], steps: Optional[int]) -> Callable[[nn.Module, int], None]:
    """``finetune`` stopped after ``steps`` training batches (None: as it is).

    The user's ``finetune(model, epochs)`` only knows whole epochs, and on a large training set one epoch
    per finalist costs more than the round's own fine-tune. A batch is counted as one forward call of the
    model in train mode; the next one is refused before it computes anything, so the optimiser has taken
    exactly ``steps`` steps (one forward per step, as a plain training loop does). The finalists share the
    same seed, so each sees the same first ``steps`` batches. ``.taken`` holds the batches of the last call.
    """
    if steps is None:
        return finetune

    def short(model: nn.Module, epochs: int) -> None:
        short.taken = 0

        def count(mod: nn.Module, _inputs: Any) -> None:
            if mod.training:
                if short.taken >= steps:
                    raise _Enough
                short.taken += 1

        handle = model.register_forward_pre_hook(count)
        try:
            finetune(model, epochs)
        except _Enough:
            pass
        finally:
            handle.remove()

    short.taken = 0
    return short


class RetrainedMeasure:
    """``measure(candidate) -> score`` after a short retraining; the model is restored after each.

    ``retrain(candidate)`` prunes the model to the candidate and retrains it (the pruner's own way:
    magnitude masks held, or channel masks with coupling); ``score()`` scores the model as it is
    then. One saved copy of the weights and buffers serves every finalist. ``ahead(candidate)``, when given,
    scores the retrained model once more before it is restored (``selection_lookahead``); its scores are kept
    in ``.ahead`` by candidate.

    ``calib``: when the search scored its candidates with adaptive BN, the retrained finalist's BatchNorm
    statistics are re-estimated on the same batches before it is scored, so that its score compares with its
    score before the retraining and with the other finalists'. The running statistics a short retraining leaves
    lag its weights (momentum, augmented batches): on MobileNetV2 at 95% sparsity, LAMP's allocation after 25
    steps scored 9.8% on the held-out images with them and 19.4% re-estimated (12.7% before the retraining), so
    every finalist looked lowered by the retraining and the choice fell back to scores at chance.
    """

    def __init__(self, model: nn.Module, retrain: Callable[[np.ndarray], None], score: Callable[[], float],
                 epochs: int, steps: Optional[int] = None, ahead: Optional[Callable[[np.ndarray], float]] = None,
                 calib: Optional[list] = None):
        self.model, self.retrain, self.score, self.epochs, self.steps = model, retrain, score, int(epochs), steps
        self.calib = list(calib) if calib else None
        self.saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.count, self.seconds = 0, 0.0
        self.look, self.ahead = ahead, {}

    def __call__(self, candidate: np.ndarray) -> float:
        t0 = time.perf_counter()
        try:
            self.retrain(candidate)
            if self.calib:
                recalibrate_bn(self.model, self.calib, len(self.calib))
            now = check_score(self.score())
            if self.look is not None:
                self.ahead[tuple(int(v) for v in candidate)] = check_score(self.look(candidate))
            return now
        finally:
            with torch.no_grad():
                self.model.load_state_dict(self.saved)
            self.count += 1
            self.seconds += time.perf_counter() - t0

    def cost(self) -> dict[str, Any]:
        """What the selection spent: finalists retrained, their fine-tune epochs (or batches) in all, seconds."""
        spent = ({"finalist_epochs_total": self.count * self.epochs} if self.steps is None
                 else {"finalist_steps_total": self.count * self.steps})
        return {"finalists_retrained": self.count, **spent, "selection_seconds": round(self.seconds, 3)}


def choose(scores: dict, seeds: set, margin: float = 0.0, before: Optional[dict] = None):
    """The winner among retrained finalists: the best search allocation replaces the best seed only when its
    score beats the seed's by more than ``margin``. On ResNet-20 at 90% sparsity, allocations within a few
    tenths of a point of LAMP after a 25-step fine-tune lost to it after the full one in every seed
    (BENCHMARKS.md, "How the allocation is chosen"): a difference smaller than the measure's own noise is
    not evidence for the search. ``margin=0`` is the plain best (ties: the order of ``scores``).

    ``before``: the finalists' scores before the short fine-tune, on the same data. When the short fine-tune
    raised none of them (:func:`uninformative`), it has not reached the recovery it is meant to predict and its
    scores rank noise; the choice is then the best by ``before``, which holds the best seed."""
    if before is not None and uninformative(scores, before):
        log.warning("the short fine-tune raised no finalist's score (%s -> %s): too short to predict the "
                    "outcome; choosing by the scores before it. Raise finalist_epochs / finalist_steps to compare "
                    "the finalists after a retraining that recovers them",
                    ", ".join(f"{before[k]:.4f}" for k in scores), ", ".join(f"{v:.4f}" for v in scores.values()))
        return max(scores, key=lambda k: before[k])
    best = max(scores, key=lambda k: scores[k])
    own = [k for k in scores if k in seeds]
    if margin <= 0 or not own or best in seeds:
        return best
    seed = max(own, key=lambda k: scores[k])
    return best if scores[best] > scores[seed] + margin else seed


def uninformative(scores: dict, before: dict) -> bool:
    """True when a short fine-tune left every finalist at or below its score before it (a retraining still in
    its first disruption, or scores at their ceiling): on a digits CNN at 98% sparsity the finalists fell from
    29-31% to 15-21% after a third of the round's fine-tune; the one that ranked first then ended at 82.0% test
    after the full fine-tune, the best before it at 89.25% (BENCHMARKS.md, "A user's model ...")."""
    return bool(scores) and all(scores[k] <= before[k] for k in scores)


def check_finalists(finalists: int, population: int, option: str) -> None:
    """The finalists come from the search's last population (plus the seeds): asking for more than it
    holds is a mistake to report before any work, not something to round down silently."""
    if finalists > population:
        raise ValueError(f"{option}={finalists} asks for more finalists than the search's population holds "
                         f"({population} allocations): give {option} <= {population}, or a larger population")
