"""Fine-tuning with recovery of pruned connections (docs/ALGORITHMS.md section 1).

A round's fine-tune runs the user's ``finetune(model, epochs)`` with masks attached. With a
recovery mode, the first ``epochs - 1`` epochs train with some pruned connections allowed back:

* ``random``: re-enable a random fraction of each layer's pruned weights, initialised to zero or
  to their last non-zero value;
* ``splicing`` (Dynamic Network Surgery): masked weights keep receiving gradients
  (straight-through) and every ``splice_interval`` training forwards each layer's mask is
  updated: prune where ``|w| <= 0.9 t``, splice back where ``|w| > 1.1 t``, ``t`` being the
  layer's cut magnitude for this round;

then the layer is cut back by magnitude to exactly the round's keep-count and one last epoch
trains with that fixed mask. The round's sparsity is therefore met exactly, and every method
in a comparison spends the same number of epochs.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .allocation import masks_from_counts
from ..targets import Target, apply_masks, get_param, masks_attached

Recovery = Literal["none", "random", "splicing"]


class Splicer:
    """DNS mask update called from the masks' forward pre-hook (works inside any training loop)."""

    def __init__(self, thresholds: dict[tuple[int, str], float], interval: int, low: float = 0.9, high: float = 1.1):
        self.thresholds = thresholds
        self.interval = max(1, int(interval))
        self.low, self.high = low, high
        self.calls: dict[tuple[int, str], int] = {}
        self.spliced = 0

    def __call__(self, module: nn.Module, name: str) -> None:
        key = (id(module), name)
        n = self.calls.get(key, 0) + 1
        self.calls[key] = n
        if n % self.interval:
            return
        t = self.thresholds[key]
        with torch.no_grad():
            w = getattr(module, name + "_orig").abs()
            mask = getattr(module, name + "_mask")
            old = mask > 0
            new = (w > self.high * t) | (old & (w > self.low * t))
            mask.copy_(new.to(mask.dtype))
            self.spliced += int((new & ~old).sum())


def _cut_magnitude(w: torch.Tensor, k: int) -> float:
    """Magnitude between the k-th kept weight and the first pruned one."""
    flat = w.detach().abs().reshape(-1)
    if k <= 0:
        return float(flat.max()) * 1.0001 + 1e-12
    if k >= flat.numel():
        return 0.0
    top = torch.topk(flat, k + 1).values
    return 0.5 * float(top[k - 1] + top[k])


def _recover_random(targets: Sequence[Target], weights: list[torch.Tensor], phase: dict[str, torch.Tensor],
                    fraction: float, init: str, last_values: Optional[dict[str, torch.Tensor]],
                    rng: np.random.Generator) -> int:
    """Re-enable ``fraction`` of each layer's pruned weights in ``phase`` (in place), at zero or at
    their last non-zero value; returns how many came back."""
    recovered = 0
    with torch.no_grad():
        for t, w in zip(targets, weights):
            pruned = (~phase[t.name]).reshape(-1).nonzero().reshape(-1).numpy()
            n_rec = int(round(fraction * pruned.size))
            if n_rec == 0:
                continue
            pick = torch.from_numpy(rng.choice(pruned, size=n_rec, replace=False))
            # indices per dimension, not ``w.view(-1)``: a channels-last conv weight has no flat view
            # (RuntimeError "view size is not compatible with input tensor's size and stride")
            at = torch.unravel_index(pick, tuple(w.shape))
            phase[t.name][at] = True
            if init == "old" and last_values is not None:
                w[at] = last_values[t.name][at].to(w.dtype)
            else:
                w[at] = 0.0
            recovered += n_rec
    return recovered


def finetune_round(
    model: nn.Module,
    targets: Sequence[Target],
    counts: Sequence[int],
    finetune: Optional[Callable[[nn.Module, int], None]],
    epochs: int,
    *,
    recovery: Recovery = "none",
    fraction: float = 0.02,
    init: str = "zero",
    splice_interval: int = 10,
    last_values: Optional[dict[str, torch.Tensor]] = None,
    rng: Optional[np.random.Generator] = None,
    torch_seed: int = 0,
    ranks: Optional[Sequence[torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prune to ``counts`` by magnitude, fine-tune (with recovery), return final masks and stats.

    On return the model's pruned weights are exactly zero and each layer keeps ``counts[l]``.
    ``ranks``: the weights' magnitude ranks when the caller has them (no sort then).
    """
    weights = [get_param(model, t) for t in targets]
    masks = {t.name: m for t, m in zip(targets, masks_from_counts(weights, counts, ranks))}
    stats = {"recovered": 0.0, "spliced": 0.0}
    splicing = recovery == "splicing" and finetune is not None and epochs >= 2
    if not splicing:  # DNS keeps pruned values behind the mask so they can be spliced back
        apply_masks(model, masks)
    if finetune is None or epochs <= 0:
        return masks, stats
    rng = rng or np.random.default_rng(0)
    if recovery != "none" and epochs >= 2:
        phase = {k: v.clone() for k, v in masks.items()}
        splicer = None
        if recovery == "random":
            stats["recovered"] = float(_recover_random(targets, weights, phase, fraction, init, last_values, rng))
        else:
            thresholds = {}
            for t, w, k in zip(targets, weights, counts):
                thresholds[(id(model.get_submodule(t.module_name)), t.param_name)] = _cut_magnitude(w, int(k))
            splicer = Splicer(thresholds, splice_interval)
        torch.manual_seed(torch_seed)
        with masks_attached(model, targets, phase, straight_through=splicer is not None, on_forward=splicer):
            finetune(model, epochs - 1)
        if splicer is not None:
            stats["spliced"] = float(splicer.spliced)
        weights = [get_param(model, t) for t in targets]
        masks = {t.name: m for t, m in zip(targets, masks_from_counts(weights, counts))}
        apply_masks(model, masks)
        epochs = 1
    torch.manual_seed(torch_seed + 1)
    with masks_attached(model, targets, masks):
        finetune(model, epochs)
    return masks, stats
