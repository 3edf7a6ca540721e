"""INC's pattern masks, and what the search needs of them.

A per-layer sparsity becomes a mask through INC's own pattern object (``1x1``, ``4x1``, ``2:4``,
whole filters ``1x{kh*kw*C_in}``), exactly as INC will prune, so a searched allocation is scored
on the masks INC will actually apply (:func:`inc_scorer`, the core's ``PatternScorer`` over INC's pattern).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from de_plugin.adapter import PatternScorer


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


def inc_scorer(modules: Dict[str, nn.Module], pattern, eval_func: Callable[[], float]) -> PatternScorer:
    """The core's :class:`PatternScorer` over INC's own pattern object: per-layer keep counts -> INC's
    masks on the layers -> ``eval_func()``, so a generation can be scored by forked workers or Ray
    actors (``de_options={"backend": "process", "workers": 2}``) on exactly the masks INC will apply."""
    ones = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in modules.items()}

    def score_of(name: str, w: torch.Tensor) -> torch.Tensor:
        return pattern.reduce_score(w.abs(), name) if hasattr(pattern, "reduce_score") else w.abs()

    def masker(name: str, score: torch.Tensor, ratio: float) -> torch.Tensor:
        return layer_mask(pattern, name, score, ratio, ratio, ones[name])

    return PatternScorer(modules, eval_func, masker=masker, score_of=score_of)


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
