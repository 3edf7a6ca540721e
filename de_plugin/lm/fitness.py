"""What a candidate allocation scores, with no retraining: the pruned model's next-token
distribution against the dense model's (EvoPress's fitness), or its perplexity.

``KL = mean over calibration positions of sum_v p_dense(v) (log p_dense(v) - log p_pruned(v))``; the
dense model's log-probabilities are computed once (``DenseReference``), so a candidate costs one
forward pass. Perplexity is ``exp`` of the mean next-token negative log-likelihood (positions 1..T-1
predicted from their prefixes).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import logits_of


class DenseReference:
    """The dense model's log-probabilities on ``batches`` (held in memory where the model's output is:
    batches x length x vocab floats; the probabilities are recomputed per batch, which costs less than a
    forward pass and would double that memory: 8 GB more for 16 batches of 8 x 128 tokens and a 128k vocabulary)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor]):
        self.batches = list(batches)
        self.logp = [F.log_softmax(logits_of(model, b).float(), dim=-1) for b in self.batches]

    @torch.no_grad()
    def kl(self, model: nn.Module, upto: int | None = None, pick: Sequence[int] | None = None) -> float:
        """Mean per-token KL(dense || model) over the first ``upto`` batches (all by default), or over the
        batches numbered in ``pick``."""
        total, count = 0.0, 0
        rows = list(zip(self.batches, self.logp))
        for b, lp in ([rows[i] for i in pick] if pick is not None else rows[:upto]):
            lq = F.log_softmax(logits_of(model, b).float(), dim=-1).to(lp.device)  # the reference may sit elsewhere
            total += float((lp.exp() * (lp - lq)).sum())
            count += lp.shape[0] * lp.shape[1]
        return total / count


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """exp(mean next-token NLL) of ``model`` on token batches."""
    nll, count = 0.0, 0
    for b in batches:
        logits = logits_of(model, b).float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1).to(logits.device),
                                     reduction="sum"))
        count += b[:, 1:].numel()
    return math.exp(nll / count)


def kl_score(dense: nn.Module, batches: Sequence[torch.Tensor]):
    """An ``evaluate(model) -> float`` for the generic pruners (``de_layerwise`` through ``prune``, NNI or
    INC): ``exp(-KL)`` from ``dense``'s next-token distribution on ``batches``, in (0, 1], 1 when the
    model predicts as the dense one does. ``dense`` is read once, here (its log-probabilities are kept)."""
    ref = DenseReference(dense, batches)

    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return math.exp(-ref.kl(model))
        finally:
            model.train(was)
    return evaluate
