"""``de_layerwise`` for Intel Neural Compressor 3.8+ (``neural-compressor-pt``), which has no pruning API.

INC 3.x selects algorithms by config class: ``register_config`` maps a config's ``name`` to its class
and ``register_algo`` maps the same name to an entry function that ``quantize`` / ``prepare`` /
``convert`` call when a config of that name is given. Both registries take third parties, so
``import de_plugin_inc`` registers :class:`DELayerwiseConfig` there:

    quantize(model, DELayerwiseConfig(target_sparsity=0.9, pattern="4x1", eval_fn=evaluate))
    autotune(model, TuningConfig(config_set=[DELayerwiseConfig(target_sparsity=[0.95, 0.9, 0.8], ...)]), eval_fn)

prune the model INC's way (``autotune`` keeps the sparsest config within INC's tolerable loss, trying
them in the order given). Quantizing the pruned model is :func:`de_plugin_inc.prune_and_quantize`:
INC 3.10 cannot compose this config with its quantizers (see :meth:`DELayerwiseConfig.__add__`).

Pruning: the DE search allocates the overall sparsity over the selected Conv/Linear layers, each
candidate masked with the core's pattern masks (``1x1``, ``NxM``, ``N:M``: INC 3.7's layouts) and
scored by ``eval_fn(model)``; the best allocation is applied, then ``finetune_fn(model)`` (optional) runs
with the masked weights' gradients zeroed, and the masks are applied again.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from neural_compressor.common.base_config import register_config
from neural_compressor.common.utils import Mode
from neural_compressor.torch.utils import utility as inc_utility
from torch import nn

from de_plugin.adapter import PatternScorer, apply_masks, check_fits, check_score, parse_pattern, pattern_mask

from .config3 import PruningConfig
from .search import DESettings, de_settings, search_targets

log = logging.getLogger("de_plugin_inc")
DE_LAYERWISE = "de_layerwise"
OP_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


@register_config(framework_name="torch", algo_name=DE_LAYERWISE, priority=0)
class DELayerwiseConfig(PruningConfig):
    """INC 3.x config of ``de_layerwise``. A list for ``target_sparsity`` or ``pattern`` makes it
    tunable by INC's ``autotune`` (one trial per value, in the order given).

    ``op_names`` / ``excluded_op_names`` are regular expressions over module names (INC's convention),
    ``op_types`` the module types pruned (subclasses included)."""

    name = DE_LAYERWISE
    non_tunable_params = ["white_list", "op_names", "excluded_op_names", "op_types", "de_options", "eval_fn",
                          "finetune_fn"]

    def __init__(self, target_sparsity: float = 0.9, pattern: str = "1x1", eval_fn: Optional[Callable] = None,
                 op_names: Tuple[str, ...] = (".*",), excluded_op_names: Tuple[str, ...] = (),
                 op_types: Tuple[str, ...] = ("Linear", "Conv2d"), de_options: Optional[Dict[str, Any]] = None,
                 max_sparsity_ratio_per_op: float = 0.98, min_sparsity_ratio_per_op: float = 0.0,
                 finetune_fn: Optional[Callable] = None, white_list=None, **kwargs):
        super().__init__(white_list=white_list)
        self.target_sparsity, self.pattern, self.eval_fn = target_sparsity, pattern, eval_fn
        self.op_names, self.excluded_op_names, self.op_types = tuple(op_names), tuple(excluded_op_names), tuple(op_types)
        self.de_options, self.finetune_fn = de_options, finetune_fn
        self.max_sparsity_ratio_per_op, self.min_sparsity_ratio_per_op = max_sparsity_ratio_per_op, min_sparsity_ratio_per_op
        self.non_tunable_params = list(type(self).non_tunable_params)
        self._post_init()

    @staticmethod
    def get_model_info(model: nn.Module, *args, **kwargs) -> List[Tuple[str, str]]:
        return [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, tuple(OP_TYPES.values()))]

    @classmethod
    def get_config_set_for_tuning(cls) -> "DELayerwiseConfig":
        return cls(target_sparsity=[0.9, 0.8, 0.7, 0.5])

    def check(self, model: nn.Module) -> tuple[Dict[str, nn.Module], DESettings]:
        """Everything wrong with this config for ``model``, raised before any work; the layers to prune and
        the search's settings (``de_options`` validated)."""
        if not callable(self.eval_fn):
            raise ValueError("DELayerwiseConfig needs eval_fn: a function model -> validation accuracy (higher is "
                             "better) that the search scores candidates with")
        t = self.target_sparsity
        if isinstance(t, (list, tuple)) or not 0.0 <= float(t) < 1.0:
            raise ValueError(f"target_sparsity must be one number in [0, 1) here (a list is for autotune), got {t!r}")
        p = parse_pattern(self.pattern)
        if float(t) > p.max_sparsity:
            raise ValueError(f"pattern {p} prunes at most {p.max_sparsity:.0%} of a layer; target_sparsity {t} "
                             "cannot be reached with it")
        settings = de_settings(self.de_options)
        modules = select_layers(model, self.op_names, self.excluded_op_names, self.op_types)
        for name, mod in modules.items():
            check_fits(p, name, mod.weight.shape)
        return modules, settings


def select_layers(model: nn.Module, op_names, excluded, op_types) -> Dict[str, nn.Module]:
    """Modules of ``op_types`` (subclasses too) whose names match an ``op_names`` regex and no excluded one."""
    bad = sorted(set(op_types) - set(OP_TYPES))
    if bad:
        raise ValueError(f"op_types {bad} are not prunable here; choose from {sorted(OP_TYPES)}")
    types = tuple(OP_TYPES[t] for t in op_types)
    chosen = {n: m for n, m in model.named_modules()
              if isinstance(m, types) and any(re.match(p, n) for p in op_names)
              and not any(re.match(p, n) for p in excluded)}
    if not chosen:
        raise ValueError(f"no layer matches op_names={list(op_names)}, op_types={list(op_types)} minus "
                         f"excluded_op_names={list(excluded)}; the model's candidates: "
                         f"{[n for n, m in model.named_modules() if isinstance(m, types)][:10]}")
    return chosen


def prune_model(model: nn.Module, config: DELayerwiseConfig) -> Dict[str, torch.Tensor]:
    """Search, apply and (optionally) fine-tune under masks, in place; the keep-masks by module name."""
    modules, settings = config.check(model)
    p = parse_pattern(config.pattern)
    scorer = PatternScorer(modules, lambda: check_score(config.eval_fn(model)), str(p))
    targets = search_targets(scorer, modules, float(config.target_sparsity), settings,
                             min(config.max_sparsity_ratio_per_op, p.max_sparsity), config.min_sparsity_ratio_per_op)
    masks = {n: pattern_mask(m.weight, targets[n], p) for n, m in modules.items()}
    apply_masks(model, weight_masks(masks))
    if config.finetune_fn is not None:
        hooks = [m.weight.register_hook(lambda g, k=masks[n]: g * k.to(g.dtype)) for n, m in modules.items()]
        try:
            config.finetune_fn(model)
        finally:
            for h in hooks:
                h.remove()
        apply_masks(model, weight_masks(masks))  # weight decay and momentum move masked weights; zero them again
    kept = sum(int(k.sum()) for k in masks.values())
    total = sum(k.numel() for k in masks.values())
    model.de_plugin_report = {"pattern": str(p), "sparsity": 1.0 - kept / total,
                              "layers": {n: 1.0 - float(k.float().mean()) for n, k in masks.items()}}
    log.info("de_layerwise (INC 3.x): %d layers, sparsity %.4f, pattern %s", len(masks), 1 - kept / total, p)
    return masks


def weight_masks(masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keep-masks by module name (INC's keys) as masks of each module's weight (the core's keys)."""
    return {f"{n}.weight": m for n, m in masks.items()}


def de_layerwise_entry(model: nn.Module, configs_mapping, mode: Mode = Mode.QUANTIZE, *args, **kwargs) -> nn.Module:
    """INC's algorithm entry: prunes at ``quantize`` and ``prepare``; ``convert`` has nothing left to do."""
    config = next(c for c in configs_mapping.values() if getattr(c, "name", None) == DE_LAYERWISE)
    if mode != Mode.CONVERT:
        prune_model(model, config)
    return model


def _register_first() -> None:
    """Quirk (INC 3.10): ``quantize`` runs the registered entries in registration order, and ours register
    after INC's quantizers; pruning must come before any quantizer, so ours go first. Idempotent."""
    from .channels3 import DE_CHANNEL, de_channel_entry

    ours = {DE_LAYERWISE: de_layerwise_entry, DE_CHANNEL: de_channel_entry}
    table = inc_utility.algos_mapping
    rest = [(k, v) for k, v in table.items() if k not in ours]
    table.clear()
    table.update(ours)
    table.update(rest)


_register_first()
