"""Budget arithmetic shared by every allocation: integer keep-counts that sum exactly to the budget
within per-layer bounds (largest remainder)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def total_keep(numels: Sequence[int], sparsity: float) -> int:
    return int(round(sum(numels) * (1.0 - sparsity)))


def largest_remainder(real_counts: np.ndarray, total: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Round real-valued counts to integers within [lower, upper] summing exactly to ``total``."""
    real = np.clip(real_counts, lower, upper)
    k = np.clip(np.floor(real).astype(np.int64), lower, upper)
    diff = int(total - k.sum())
    frac = real - np.floor(real)
    if diff > 0:
        for i in np.argsort(-frac, kind="stable"):
            if diff == 0:
                break
            room = int(upper[i] - k[i])
            add = min(room, 1 if frac[i] > 0 else room, diff)
            k[i] += add
            diff -= add
        for i in np.argsort(-(upper - k), kind="stable"):  # still short: fill wherever room is
            if diff == 0:
                break
            add = min(int(upper[i] - k[i]), diff)
            k[i] += add
            diff -= add
    elif diff < 0:
        for i in np.argsort(frac, kind="stable"):
            if diff == 0:
                break
            take = min(int(k[i] - lower[i]), 1, -diff)
            k[i] -= take
            diff += take
        for i in np.argsort(-(k - lower), kind="stable"):
            if diff == 0:
                break
            take = min(int(k[i] - lower[i]), -diff)
            k[i] -= take
            diff += take
    if diff != 0:
        raise ValueError(
            f"cannot keep exactly {total} weights within the per-layer bounds "
            f"(min {int(lower.sum())}, max {int(upper.sum())}); relax max_layer_sparsity or min_layer_sparsity"
        )
    return k


def fit_budget(
    density: np.ndarray, numels: np.ndarray, total: int, min_keep: np.ndarray, upper: np.ndarray | None = None
) -> np.ndarray:
    """Scale per-layer densities by one factor so the kept counts sum to ``total`` (repair).

    Preserves the *shape* of an allocation (which layers are pruned harder) while meeting the
    budget exactly; layers hitting their bounds are clipped and the rest absorb the difference.
    """
    numels = np.asarray(numels, dtype=np.int64)
    upper = numels if upper is None else np.maximum(np.asarray(upper, dtype=np.int64), min_keep)
    density = np.clip(np.asarray(density, dtype=float), 0.0, 1.0)
    lo_c, hi_c = 0.0, 1.0
    want = lambda c: np.clip(density * c * numels, min_keep, upper).sum()  # noqa: E731
    while want(hi_c) < total and hi_c < 1e12:
        hi_c *= 2.0
        if np.all(density == 0):
            density = np.ones_like(density)
    for _ in range(100):
        mid = 0.5 * (lo_c + hi_c)
        if want(mid) < total:
            lo_c = mid
        else:
            hi_c = mid
    real = np.clip(density * hi_c * numels, min_keep, upper)
    return largest_remainder(real, total, min_keep.astype(np.int64), upper.astype(np.int64))
