"""Search-free baselines (docs/ALGORITHMS.md section 4), run through the same loop as de_layerwise."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..search.budget import fit_budget
from . import allocation
from ..hookspecs import hookimpl
from ..registry import registered_allocations
from .rounds import IterativePruner, State


class _AllocationPruner(IterativePruner):
    rule = staticmethod(allocation.uniform)

    def allocate(self, state: State, keep: int, round_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        sparsity = 1.0 - keep / state.total
        counts = self.rule(state.weights(), sparsity)
        lo = state.min_keep(self.options.max_layer_sparsity)
        hi = state.max_keep(self.options.min_layer_sparsity)
        if np.any(counts < lo) or np.any(counts > hi):  # respect the per-layer bounds like the DE does
            counts = fit_budget(np.clip(counts, lo, hi) / state.numels, state.numels, keep, lo, upper=hi)
        return counts, {}


class UniformMagnitude(_AllocationPruner):
    """Same sparsity in every layer, magnitude inside each layer."""

    name = "uniform_magnitude"
    rule = staticmethod(allocation.uniform)


class GlobalMagnitude(_AllocationPruner):
    """One magnitude threshold over all pruned layers."""

    name = "global_magnitude"
    rule = staticmethod(allocation.global_magnitude)


class Lamp(_AllocationPruner):
    """LAMP scores (Lee et al., ICLR 2021), one global top-k."""

    name = "lamp"
    rule = staticmethod(allocation.lamp)


class Erk(_AllocationPruner):
    """Erdos-Renyi-Kernel densities (Evci et al., 2020)."""

    name = "erk"
    rule = staticmethod(allocation.erk)


def allocation_pruner(name: str, rule) -> type:
    """A baseline pruner of a plugin's allocation rule (``register_allocations``): that allocation, magnitude
    inside each layer, the same rounds as the built-in baselines."""
    return type(f"Allocation_{name}", (_AllocationPruner,), {
        "name": name, "rule": staticmethod(rule), "__module__": __name__,
        "__doc__": f"The plugin allocation {name!r} as a baseline pruner."})


@hookimpl
def register_pruners():
    plugged = [allocation_pruner(n, r) for n, r in registered_allocations().items() if n not in allocation.ALLOCATIONS]
    return [UniformMagnitude, GlobalMagnitude, Lamp, Erk, *plugged]
