"""INC's pattern masks, and what the search needs of them.

A per-layer sparsity becomes a mask through INC's own pattern object (``1x1``, ``4x1``, ``2:4``,
whole filters ``1x{kh*kw*C_in}``), exactly as INC will prune, so a searched allocation is scored
on the masks INC will actually apply (:class:`PatternScorer`, the scorer the core's allocator runs).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from de_plugin.adapter import check_score


def layer_mask(pattern, name: str, score: torch.Tensor, ratio: float, final_ratio: float,
               pre_mask: torch.Tensor) -> torch.Tensor:
    """One layer's mask at ``ratio`` with INC's pattern (``1x1``, ``4x1``, ``2:4``...).

    Quirk (INC 3.7.1): the pattern clips a layer to the pattern's single ``target_sparsity_ratio``
    and remembers layers it adjusted in ``keep_mask_layers`` (then never updates them again);
    we set the layer's own final target and forget that memory before each call.
    """
    pattern.keep_mask_layers = {}
    pattern.target_sparsity_ratio = final_ratio
    pattern.max_sparsity_ratio_per_op = max(pattern.max_sparsity_ratio_per_op, final_ratio)
    return pattern.get_masks_local({name: score}, ratio, {name: pre_mask})[name]


class PatternScorer:
    """Per-layer keep counts -> INC's own pattern masks on the layers -> ``eval_func()``: a
    :class:`de_plugin.adapter.Scorer`, so a generation can be scored by forked workers or Ray
    actors (``de_options={"backend": "process", "workers": 2}``)."""

    def __init__(self, modules: Dict[str, nn.Module], pattern, eval_func: Callable[[], float]):
        self.names = list(modules)
        # the round's weights travel to workers as this holder's state (keys cannot contain dots)
        self.model = nn.ModuleDict({n.replace(".", "/"): modules[n] for n in self.names})
        self.modules, self.pattern, self.eval_func = modules, pattern, eval_func
        self.reset()

    def reset(self) -> None:
        self.weights = [self.modules[n].weight for n in self.names]
        self.saved = [w.detach().clone() for w in self.weights]
        self.ones = {n: torch.ones_like(w, dtype=torch.bool) for n, w in zip(self.names, self.weights)}
        p = self.pattern
        self.scores = {n: p.reduce_score(w.abs(), n) if hasattr(p, "reduce_score") else w.abs()
                       for n, w in zip(self.names, self.saved)}

    def score(self, counts, floor=None) -> float:
        with torch.no_grad():
            for n, w, w0, k in zip(self.names, self.weights, self.saved, counts):
                r = 1.0 - int(k) / w0.numel()
                m = layer_mask(self.pattern, n, self.scores[n], float(r), float(r), self.ones[n])
                w.copy_(w0 * m.to(w0.dtype))
            try:
                return check_score(self.eval_func())
            finally:
                self.restore()

    def restore(self) -> None:
        with torch.no_grad():
            for w, w0 in zip(self.weights, self.saved):
                w.copy_(w0)


def filter_pattern(module: nn.Module) -> str:
    """INC's whole-filter block for a conv: ``1x{kh*kw*C_in}``."""
    w = module.weight
    return f"1x{w[0].numel()}"


def check_pattern(pattern: str, modules: Dict[str, nn.Module]) -> None:
    for name, mod in modules.items():
        if not isinstance(mod, nn.Conv2d):
            raise ValueError(f"random_coarse prunes Conv2d feature maps; {name!r} is a {type(mod).__name__} "
                             "(select convs with pruning_op_types=['Conv2d'])")
        if pattern not in ("1xchannel", filter_pattern(mod)):
            raise ValueError(f"random_coarse removes whole filters: layer {name!r} needs pattern "
                             f"{filter_pattern(mod)!r} (kh*kw*C_in) or '1xchannel', got {pattern!r}. "
                             "de_plugin_inc.search_config writes one entry per layer with its pattern")
