"""Grouped parametrisation: one DE value per group of layers, plus bounded per-layer offsets.

At 50-200 layers a DE population of 20-30 cannot explore one free value per layer in 20
generations; sharing one value per stage, block or layer type cuts the dimension to what the
population can search, while small per-layer offsets (``group_offset``, in the space's units: the
sparsity for ``ratio``) keep layers inside a group free to differ a little.

Groupings (the ``groups`` option of ``de_layerwise``):

* ``"layer"``: no grouping (one value per layer, the default);
* ``"stage"``: the first component of the layer name (``layer1``, ``layer2``, ``features``, ``fc``);
* ``"block"``: the first two components (``layer1.0``, ``features.3``, ``blocks.2``);
* ``"type"``: the kind of layer (``conv3x3``, ``conv1x1``, ``depthwise``, ``linear``, ``attention``);
* an integer ``n``: ``n`` runs of consecutive layers (model order) of about equal weight count;
* a dict ``{group name: [layer-name patterns]}``: every layer in exactly one group.
"""
from __future__ import annotations

import fnmatch
from typing import Optional, Sequence, Union

import numpy as np
from torch import nn

from .allocator import KeepSpace
from ..targets import Target

GroupSpec = Union[str, int, dict]
NAMED = ("layer", "stage", "block", "type")


def layer_kind(t: Target, model: Optional[nn.Module] = None) -> str:
    """The ``type`` grouping's key of one target (depthwise from the conv's ``groups`` when the model
    is given, else from the shape: one input channel per filter)."""
    parts = t.module_name.split(".")
    if (t.module_type in ("MultiheadAttention", "NonDynamicallyQuantizableLinear") or t.param_name == "in_proj_weight"
            or any(p in ("attn", "attention", "self_attention") for p in parts)):
        return "attention"
    if len(t.shape) == 4:
        groups = getattr(model.get_submodule(t.module_name), "groups", 1) if model is not None else None
        if (groups > 1 and groups == t.shape[0]) if groups is not None else (t.shape[1] == 1 and t.shape[2] * t.shape[3] > 1):
            return "depthwise"
        return f"conv{t.shape[2]}x{t.shape[3]}"
    return "linear" if len(t.shape) == 2 else f"{len(t.shape)}d"


def resolve_groups(spec: GroupSpec, targets: Sequence[Target],
                   model: Optional[nn.Module] = None) -> list[tuple[str, list[int]]]:
    """The groups ``spec`` stands for, as (name, target indices) in model order; ``[]`` for ``"layer"``.

    Raises ``ValueError`` (before any work) for a layer in no group or in two, a pattern that
    matches no layer, or an unknown grouping.
    """
    names = [t.name for t in targets]
    if isinstance(spec, bool) or not isinstance(spec, (str, int, dict)):
        raise ValueError(f"groups must be one of {NAMED}, an integer or a dict of name -> patterns, got {spec!r}")
    if isinstance(spec, int):
        return _runs(spec, targets)
    if isinstance(spec, dict):
        return _from_patterns(spec, names)
    if spec not in NAMED:
        raise ValueError(f"unknown groups {spec!r}; choose one of {NAMED}, an integer or a dict of name -> patterns")
    if spec == "layer":
        return []
    key = {"stage": lambda t: t.name.split(".")[0],
           "block": lambda t: ".".join(t.module_name.split(".")[:2]) or t.name,
           "type": lambda t: layer_kind(t, model)}[spec]
    out: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        out.setdefault(key(t), []).append(i)
    return list(out.items())


def _runs(n: int, targets: Sequence[Target]) -> list[tuple[str, list[int]]]:
    if not 1 <= n <= len(targets):
        raise ValueError(f"groups={n}: give between 1 and {len(targets)} (the number of pruned layers) runs")
    cum = np.cumsum([t.numel for t in targets]) / sum(t.numel for t in targets)
    cuts, prev, L = [], 0, len(targets)
    for j in range(1, n):  # run j-1 ends where the weights pass j/n of the total; every run non-empty
        c = min(max(int(np.searchsorted(cum, j / n)) + 1, prev + 1), L - (n - j))
        cuts.append(c)
        prev = c
    return [(f"run{j}", [int(i) for i in r]) for j, r in enumerate(np.split(np.arange(L), cuts))]


def _from_patterns(spec: dict, names: list[str]) -> list[tuple[str, list[int]]]:
    owner: dict[int, str] = {}
    out = []
    for gname, patterns in spec.items():
        if isinstance(patterns, str):
            patterns = [patterns]
        idx = [i for i, n in enumerate(names) if any(fnmatch.fnmatchcase(n, p) or n == p for p in patterns)]
        if not idx:
            raise ValueError(f"group {gname!r}: the patterns {list(patterns)} match no pruned layer; "
                             f"layers are named like {names[:3]}")
        for i in idx:
            if i in owner:
                raise ValueError(f"layer {names[i]!r} is in two groups ({owner[i]!r} and {gname!r}); "
                                 "make the patterns disjoint")
            owner[i] = gname
        out.append((str(gname), idx))
    missing = [names[i] for i in range(len(names)) if i not in owner]
    if missing:
        raise ValueError(f"{len(missing)} pruned layer(s) are in no group, e.g. {missing[:3]}; add patterns for "
                         "them (e.g. a catch-all group) or exclude them from pruning")
    return sorted(out, key=lambda g: g[1][0])


def search_dim(groups: Sequence, n_layers: int, offset: float) -> int:
    """Length of the DE vector: one value per layer, or per group plus one offset per layer."""
    return len(groups) + (n_layers if offset > 0 else 0) if groups else n_layers


class GroupedSpace(KeepSpace):
    """A :class:`KeepSpace` seen through groups: ``x = (g_1..g_G, o_1..o_L)`` (offsets only when
    ``offset > 0``), layer l's value ``clip(g_group(l) + o_l)`` in the base space's units.

    The map from vectors to counts is exact (the budget projection is the base space's); the way
    back (:meth:`to_x`: group mean, offsets clipped) is approximate, so the allocator keeps the
    asked vectors in the population instead of repaired ones (``repairs = False``)."""

    repairs = False

    def __init__(self, base: KeepSpace, groups: list[list[int]], offset: float):
        super().__init__(base.numels, base.min_keep, base.max_keep, base.bounds)
        self.base, self.groups, self.offset = base, [list(g) for g in groups], float(offset)
        self.owner = np.empty(len(base.numels), dtype=np.int64)
        for gi, g in enumerate(self.groups):
            self.owner[g] = gi
        lo, hi = np.array(base.bounds, dtype=float).T
        self.layer_lo, self.layer_hi = lo, hi
        gb = [(float(lo[g].min()), float(hi[g].max())) for g in self.groups]
        self.group_lo, self.group_hi = np.array(gb).T
        self.bounds = gb + ([(-self.offset, self.offset)] * len(lo) if self.offset > 0 else [])

    def layer_values(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        v = x[: len(self.groups)][self.owner]
        if self.offset > 0:
            v = v + x[len(self.groups):]
        return np.clip(v, self.layer_lo, self.layer_hi)

    def to_counts(self, x: np.ndarray) -> np.ndarray:
        return self.base.to_counts(self.layer_values(x))

    def to_x(self, counts: np.ndarray) -> np.ndarray:
        xl = self.base.to_x(counts)
        g = np.array([float(np.mean(xl[idx])) for idx in self.groups])
        parts = [np.clip(g, self.group_lo, self.group_hi)]
        if self.offset > 0:
            parts.append(np.clip(xl - parts[0][self.owner], -self.offset, self.offset))
        return np.concatenate(parts)
