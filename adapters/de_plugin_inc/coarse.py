"""``pruning_type="random_coarse"`` in INC's loop (registered as ``pt_random_coarse``).

Feature-map pruning is INC's whole-filter pattern: a conv weight reshaped by INC to
``[C_out, kh*kw*C_in]`` loses whole rows, i.e. ``pattern="1x{kh*kw*C_in}"`` (or ``"1xchannel"``) per
layer. The best of N random filter masks is picked by the core (coupled channels removed together,
adaptive BN, scoring with the entry's ``eval_func``) at the first pruning step, or up front by
:func:`search_config`, which writes one entry per layer with its exact pattern, target and chosen
filters (``channel_keep``). INC's scheduler then prunes towards that mask and INC's loop retrains.
INC masks conv weights only: BatchNorm and the consumers of removed maps are not masked by INC.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List, Optional

import torch
from neural_compressor.compression.pruner.pruners.base import register_pruner
from torch import nn

from de_plugin.coarse import CoarseOptions, CoarseSpace, best_of_n, calibration_batches, capture_input
from de_plugin.options import validate_options
from de_plugin.pruner import check_score

from .pruner import SearchedPruner, selected_modules
from .search import layer_mask, per_layer_entry

log = logging.getLogger("de_plugin_inc")
COARSE_KEYS = {"candidates", "adaptive_bn", "bn_batches", "score", "seed"}


def coarse_settings(options: Optional[Dict[str, Any]]) -> tuple[CoarseOptions, int]:
    """Validate ``coarse_options`` (feature-map ratios come from target_sparsity)."""
    opts = dict(options or {})
    seed = int(opts.pop("seed", 0))
    bad = sorted(set(opts) - COARSE_KEYS)
    if bad:
        raise ValueError(f"unknown coarse_options {bad}: inside INC the ratio is target_sparsity and INC's loop "
                         f"retrains; valid: {sorted(COARSE_KEYS)}")
    return validate_options(CoarseOptions, "random_coarse", {**opts, "finetune_epochs": 0}), seed


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


def search_channels(model: nn.Module, layers: Dict[str, float], eval_func: Callable[[nn.Module], float],
                    options: Optional[Dict[str, Any]] = None, train_data: Optional[List[Any]] = None,
                    ) -> Dict[str, List[bool]]:
    """Best of N random feature-map masks at the given per-layer ratios: kept filters per layer."""
    o, seed = coarse_settings(options)
    o.ratios = dict(layers)
    o.feature_map_ratio = 0.0
    example, _ = capture_input(model, lambda: check_score(eval_func(model)))
    space = CoarseSpace(model, example, list(layers), o)
    missing = sorted(set(layers) - {p for g in space.groups for p in g.producers})
    if missing:
        raise ValueError(f"layers {missing} have no prunable feature maps (they reach the output, or share channels "
                         f"with a layer that is not selected: select all coupled layers together)")
    calib = calibration_batches(model, o, train_data, None)
    best, score, scores = best_of_n(model, space, lambda m: eval_func(m), o, seed, calib, progress=False)
    log.info("random_coarse (INC): best of %d candidates, val %.4f", len(scores), score)
    keep: Dict[str, List[bool]] = {}
    for g, k in zip(space.groups, best["channels"]):
        for p in g.producers:
            keep[p] = [bool(v) for v in k]
    return {n: keep[n] for n in layers}


@register_pruner("pt_random_coarse")
class PytorchRandomCoarsePruner(SearchedPruner):
    """INC's basic pruner whose filter scores are the kept filters of the best random mask."""

    label = "random_coarse"

    def __init__(self, config, modules):
        config["criterion_type"] = "magnitude"
        check_pattern(config["pattern"], modules)
        coarse_settings(config.get("coarse_options"))
        keep = config.get("channel_keep")
        if keep is None:
            ev = config.get("eval_func")
            if not callable(ev):
                raise ValueError("pruning_type='random_coarse' needs 'eval_func' (model -> accuracy) in its pruning "
                                 "config entry, or 'channel_keep' from de_plugin_inc.search_config")
        super().__init__(config, modules)
        self.channel_keep: Optional[Dict[str, List[bool]]] = None
        if keep is not None:
            if len(modules) != 1:
                raise ValueError("channel_keep is per layer: give one layer per entry (search_config does)")
            self.channel_keep = {next(iter(modules)): list(keep)}

    def _search(self) -> None:
        ref = self.config.get("model_ref")
        if ref is None:
            raise ValueError("random_coarse needs the model: use INC's prepare_pruning / prepare_compression")
        self.channel_keep = search_channels(ref.model, {n: self.target_sparsity_ratio for n in self.modules},
                                            self.config["eval_func"], self.config.get("coarse_options"),
                                            self.config.get("train_data"))

    def searched(self) -> bool:
        return self.channel_keep is not None

    def step_masks(self, current: float) -> bool:
        for name, mod in self.modules.items():
            keep = torch.tensor(self.channel_keep[name], dtype=mod.weight.dtype, device=mod.weight.device)
            final = 1.0 - float(keep.mean())
            score = keep.view(-1, *([1] * (mod.weight.dim() - 1))).expand_as(mod.weight).clone()
            score = self.pattern.reduce_score(score, name, force=True)  # INC's block form, as its criteria do
            ratio = min(final, current * final / self.target_sparsity_ratio) if self.target_sparsity_ratio else 0.0
            self.masks[name] = layer_mask(self.pattern, name, score, ratio, final, self.masks[name])
        return True


def search_config(model: nn.Module, config, eval_func: Callable[[nn.Module], float],
                  train_data: Optional[List[Any]] = None, **coarse_options: Any):
    """Pick the random_coarse masks before training; return a ``WeightPruningConfig`` whose
    random_coarse entries are one per layer with ``pattern="1x{kh*kw*C_in}"``, the layer's
    ``target_sparsity`` and its chosen filters. Other entries are kept. The model is not modified."""
    from neural_compressor.compression.pruner.utils import process_config
    from neural_compressor.training import WeightPruningConfig

    if not callable(eval_func):
        raise TypeError("eval_func must be callable as eval_func(model) -> float")
    work = copy.deepcopy(model)
    entries: List[Dict[str, Any]] = []
    for info, entry in zip(process_config(config), list(config.pruning_configs)):
        if info["pruning_type"] != "random_coarse":
            entries.append(dict(entry))
            continue
        t = info.get("target_sparsity")
        if t is None or not 0.0 <= float(t) < 1.0:
            raise ValueError(f"random_coarse: target_sparsity (fraction of filters removed) must lie in [0, 1), got {t}")
        modules = {n: m for n, m in selected_modules(info, work).items() if isinstance(m, nn.Conv2d)}
        if not modules:
            raise ValueError(f"op_names {info.get('op_names')} select no Conv2d layer for random_coarse")
        keep = search_channels(work, {n: float(t) for n in modules}, eval_func,
                               {**(entry.get("coarse_options") or {}), **coarse_options}, train_data)
        entries += [per_layer_entry(entry, info, name, pruning_type="random_coarse", channel_keep=k,
                                    pattern=filter_pattern(modules[name]), target_sparsity=1.0 - sum(k) / len(k))
                    for name, k in keep.items()]
    return WeightPruningConfig(pruning_configs=entries, **dict(config.weight_compression))
