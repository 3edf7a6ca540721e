"""Per-layer keep-counts for a global sparsity without a search: uniform and OWL.

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): a block's outlier ratio ``D`` is the share
of its Wanda scores ``|W_ij| ||X_j||`` above ``M`` times their mean (``M = 5``); the ratios are scaled to
``[0, 2 lambda]`` (``lambda = 0.08``), centred, and added to the target density, so blocks with more
outliers keep more weights; every layer of a block gets its block's density. Counts are then fitted to
the exact global budget.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..search.budget import fit_budget, total_keep
from .calibration import LayerStats
from .targets import LMLayer


def uniform_counts(layers: Sequence[LMLayer], sparsity: float) -> np.ndarray:
    numels = np.array([l.numel for l in layers])
    return fit_budget(np.full(len(numels), 1.0 - sparsity), numels, total_keep(numels, sparsity),
                      np.zeros(len(numels), dtype=np.int64))


def owl_densities(layers: Sequence[LMLayer], stats: LayerStats, sparsity: float, m: float = 5.0,
                  lam: float = 0.08) -> np.ndarray:
    """OWL's per-layer densities (each layer gets its block's)."""
    blocks = sorted({l.block for l in layers})
    ratio = []
    for b in blocks:
        scores = torch.cat([(l.weight.detach().abs().float() * stats.norms(i)[None, :]).flatten()
                            for i, l in enumerate(layers) if l.block == b])
        ratio.append(float((scores > m * scores.mean()).float().mean()))
    r = np.array(ratio)
    spread = r.max() - r.min()
    r = (r - r.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(r)
    dens = r - r.mean() + (1.0 - sparsity)
    by_block = dict(zip(blocks, dens))
    return np.clip(np.array([by_block[l.block] for l in layers]), 0.0, 1.0)


def owl_counts(layers: Sequence[LMLayer], stats: LayerStats, sparsity: float, m: float = 5.0,
               lam: float = 0.08) -> np.ndarray:
    numels = np.array([l.numel for l in layers])
    return fit_budget(owl_densities(layers, stats, sparsity, m, lam), numels, total_keep(numels, sparsity),
                      np.zeros(len(numels), dtype=np.int64))
