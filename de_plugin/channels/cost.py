"""What a channel allocation costs (MACs or parameters), in closed form, and the DE space over it.

``de_channel`` scores thousands of per-group channel counts and projects every DE vector onto a
MACs / parameter budget, which needs the cost of an allocation many times per candidate. A masked
forward pass (:func:`de_plugin.channels.coarse.count_macs`) would cost a model evaluation each time, so the
cost is read off the coupling instead: removing ``r_g`` channels of group ``g`` removes ``r_g x m``
rows or columns of every tensor that carries them (``m``: 1, a Linear consumer's ``H*W`` columns per
channel, or ``1/groups`` for the in-group columns of a grouped conv). Every weight's alive entries
are then the product over its two channel dimensions, so a conv's MACs are its dense MACs times the
kept share of its output and of its input channels. The test suite checks the closed form against
:func:`count_macs` on the masks, model by model.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from torch import nn

from ..search.allocator import KeepSpace
from .coarse import CoarseSpace, count_macs

Measure = Literal["macs", "params", "latency"]


class ChannelCost:
    """MACs and parameters of a model as functions of the kept channels per coupled group.

    Counts are in *units*: a group with a grouped conv over it keeps ``q`` channels in each of its
    ``channels / block`` conv groups (``q`` in 1 .. block), any other group ``q`` channels (1 .. channels).
    """

    def __init__(self, model: nn.Module, space: CoarseSpace, example: Any):
        self.groups = space.groups
        n = len(self.groups)
        self.size = np.array([g.block if g.block > 1 else g.channels for g in self.groups], dtype=np.int64)
        self.step = np.array([g.channels // s for g, s in zip(self.groups, self.size)], dtype=np.int64)
        self.channels = self.size * self.step
        dense = count_macs(model, example)
        self.macs_dense, self.params_dense = int(dense["macs_dense"]), int(dense["params_dense"])
        rows = _removal_rows(space, n)
        names = sorted(rows)
        shapes = [tuple(space.param(t).shape) for t in names]
        # parameters: numel - prod_d (size_d - rows_d . r) * rest
        self._p_size = np.array([[s[0], s[1] if len(s) > 1 else 1] for s in shapes], dtype=float)
        self._p_rest = np.array([math.prod(s[2:]) for s in shapes], dtype=float)
        self._p_rows = [np.stack([rows[t].get(d, np.zeros(n)) for t in names]) for d in (0, 1)]
        extra_dims = [(t, d) for t in names for d in rows[t] if d > 1]
        if extra_dims:  # e.g. a positional embedding over channels on a later axis: move it to axis 0 / 1 terms
            raise NotImplementedError(f"channel dimension beyond axis 1 in {extra_dims}")
        # MACs: dense MACs of each conv / Linear whose weight loses rows or columns
        layer = dense["layer_macs"]
        mods = [t for t in names if t.endswith(".weight") and t[:-7] in layer]
        idx = [names.index(t) for t in mods]
        self._m_dense = np.array([layer[t[:-7]] for t in mods], dtype=float)
        self._m_const = float(sum(v for k, v in layer.items() if f"{k}.weight" not in mods))
        self._m_size = self._p_size[idx]
        self._m_rows = [r[idx] for r in self._p_rows]
        self.layers = [t[:-7] for t in mods]
        #: per layer: whether it loses output rows / input columns (what a latency table must time)
        self.prunable = {n: (bool(self._m_rows[0][i].any()), bool(self._m_rows[1][i].any()))
                         for i, n in enumerate(self.layers)}
        self.table = None  #: a LatencyTable, for the "latency" measure

    def removed(self, q: np.ndarray) -> np.ndarray:
        """Channels removed per group for unit counts ``q``."""
        return (self.channels - np.asarray(q) * self.step).astype(float)

    def macs(self, q: np.ndarray) -> float:
        r = self.removed(q)
        kept0 = 1.0 - self._m_rows[0] @ r / self._m_size[:, 0]
        kept1 = 1.0 - self._m_rows[1] @ r / self._m_size[:, 1]
        return self._m_const + float(np.sum(self._m_dense * kept0 * kept1))

    def kept_shares(self, q: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
        """Per layer: the kept share of its output channels and of its input channels."""
        r = self.removed(q)
        kept0 = 1.0 - self._m_rows[0] @ r / self._m_size[:, 0]
        kept1 = 1.0 - self._m_rows[1] @ r / self._m_size[:, 1]
        return dict(zip(self.layers, kept0.tolist())), dict(zip(self.layers, kept1.tolist()))

    def latency(self, q: np.ndarray) -> float:
        if self.table is None:
            raise ValueError("no latency table: the latency budget builds one (ChannelCost.table)")
        return self.table.predict(*self.kept_shares(q))

    def params(self, q: np.ndarray) -> float:
        r = self.removed(q)
        alive = (self._p_size[:, 0] - self._p_rows[0] @ r) * (self._p_size[:, 1] - self._p_rows[1] @ r) * self._p_rest
        total = self._p_size[:, 0] * self._p_size[:, 1] * self._p_rest
        return float(self.params_dense - np.sum(total - alive))

    def cost(self, q: np.ndarray, measure: Measure) -> float:
        return self.macs(q) if measure == "macs" else self.params(q) if measure == "params" else self.latency(q)

    def dense(self, measure: Measure) -> float:
        if measure == "latency":
            return self.latency(self.size)
        return float(self.macs_dense if measure == "macs" else self.params_dense)


def _removal_rows(space: CoarseSpace, n: int) -> dict[str, dict[int, np.ndarray]]:
    """Per tensor and channel dimension: how many entries each group's removed channel takes away
    (the closed form of :meth:`CoarseSpace.masks` for feature-map masks)."""
    rows: dict[str, dict[int, np.ndarray]] = {}

    def add(name: str, dim: int, g: int, mult: float) -> None:
        if name in space.params:
            rows.setdefault(name, {}).setdefault(dim, np.zeros(n))[g] += mult

    for gi, g in enumerate(space.groups):
        for m in g.producers + [b for b, _ in g.batchnorms + g.depthwise + g.grouped]:
            add(f"{m}.weight", 0, gi, 1.0)
            add(f"{m}.bias", 0, gi, 1.0)
        for m, _ in g.grouped:  # its in-group columns: one per removed channel in each conv group's filters
            add(f"{m}.weight", 1, gi, 1.0 / space.modules[m].groups)
        for name, dim, _ in g.params:
            add(name, dim, gi, 1.0)
        for m, _, rep in g.consumers:
            add(f"{m}.weight", 1, gi, float(rep))
    return rows


class ChannelSpace(KeepSpace):
    """DE vectors (removed share per group) <-> unit counts, projected onto a cost budget.

    :meth:`project` returns the allocation that keeps the most under the budget along the vector's
    shape: one factor scales every group's kept share (bisection), then groups take one more unit
    at a time, largest rounding deficit first, while the cost stays within the budget. The result
    never exceeds the budget, and no group can keep one more unit without exceeding it.
    """

    def __init__(self, cost: ChannelCost, measure: Measure, min_q: np.ndarray, max_q: np.ndarray, max_ratio: float):
        super().__init__(cost.size, min_q, max_q, [(0.0, max_ratio)] * len(cost.size))
        self.c, self.measure = cost, measure

    def to_counts(self, x: np.ndarray) -> np.ndarray:
        q = np.round((1.0 - np.asarray(x, dtype=float)) * self.numels).astype(np.int64)
        return np.clip(q, self.min_keep, self.max_keep)

    def to_x(self, counts: np.ndarray) -> np.ndarray:
        return 1.0 - np.asarray(counts) / self.numels

    def fit(self, counts_or_density: np.ndarray, budget: float, is_density: bool = False) -> np.ndarray:
        d = np.asarray(counts_or_density, dtype=float)
        return self.project_density(d if is_density else d / self.numels, budget)

    def project(self, x: np.ndarray, budget: float) -> np.ndarray:
        return self.project_density(1.0 - np.asarray(x, dtype=float), budget)

    def project_density(self, density: np.ndarray, budget: float) -> np.ndarray:
        """Unit counts shaped like ``density`` (kept share per group), as large as ``budget`` allows."""
        lo_q, hi_q = self.min_keep, self.max_keep
        target = np.maximum(np.asarray(density, dtype=float), 1e-6) * self.numels

        def counts(t: float) -> np.ndarray:
            return np.clip(np.floor(t * target + 1e-9).astype(np.int64), lo_q, hi_q)

        cost = lambda q: self.c.cost(q, self.measure)  # noqa: E731
        lo, hi = 0.0, float(np.max(hi_q / target)) + 1.0
        if cost(counts(hi)) <= budget:
            return counts(hi)
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost(counts(mid)) <= budget else (lo, mid)
        q = counts(lo)
        # then one more unit per group while the budget allows, largest rounding deficit first; a group
        # that does not fit never will (the others only grow), so each pass tries the last pass's growers
        order = [int(g) for g in np.argsort(-(lo * target - q), kind="stable")]
        while order:
            grew = []
            for g in order:
                if q[g] < hi_q[g]:
                    q[g] += 1
                    if cost(q) <= budget:
                        grew.append(g)
                    else:
                        q[g] -= 1
            order = grew
        return q

