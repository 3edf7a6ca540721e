"""Adaptive BatchNorm: re-estimating the running statistics of a pruned model on a few training batches,
and putting them back."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers (what adaptive BN re-estimates)."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def recalibrate_bn(model: nn.Module, batches: Sequence[Any], num_batches: int) -> None:
    """EagleEye's adaptive BN: reset BatchNorm statistics and re-estimate them (cumulative average)
    from ``num_batches`` training batches, in train mode for BN only, without gradients."""
    bns = batch_norms(model)
    if not bns:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    dev = next(model.parameters()).device
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for b in list(batches)[:num_batches]:
                x = b[0] if isinstance(b, (tuple, list)) else b
                model(x.to(dev))
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, t in modes.items():
            m.train(t)


class BNState:
    """The model's BatchNorm running statistics, saved once and put back after every candidate
    scored with adaptive BN (the user's statistics are never left re-estimated)."""

    def __init__(self, model: nn.Module):
        self.bns = batch_norms(model)
        self.saved = [{k: v.clone() for k, v in bn.state_dict().items() if not k.endswith(("weight", "bias"))}
                      for bn in self.bns]

    def restore(self) -> None:
        with torch.no_grad():
            for bn, saved in zip(self.bns, self.saved):
                for k, v in saved.items():
                    getattr(bn, k).copy_(v)
