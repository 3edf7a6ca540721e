"""Pruners by name for NNI 3.0, which has no registry of its own.

``create_pruner("de_layerwise" | "level" | "l1norm" | ... , model, config_list, evaluator, **options)``.
Schedulers (``linear``, ``agp``) wrap another pruner named by ``options["pruner"]`` (default
``level``) with ``options["pruner_options"]``, and take ``interval_steps`` / ``total_times``.
"""
from __future__ import annotations

from typing import Any, Dict, List

from nni.compression.pruning import (
    AGPPruner,
    FPGMPruner,
    L1NormPruner,
    L2NormPruner,
    LevelPruner,
    LinearPruner,
    MovementPruner,
    SlimPruner,
    TaylorPruner,
)
from torch import nn

from de_plugin.adapter import lookup

from .entries import validated_entries
from .evaluators import patch_lightning_evaluator
from .channel import DEChannelPruner
from .coarse import RandomCoarsePruner
from .pruner import DELayerwisePruner

PRUNERS: Dict[str, type] = {
    "de_layerwise": DELayerwisePruner,
    "random_coarse": RandomCoarsePruner,
    "de_channel": DEChannelPruner,
    "level": LevelPruner,
    "l1norm": L1NormPruner,
    "l2norm": L2NormPruner,
    "fpgm": FPGMPruner,
    "slim": SlimPruner,
    "taylor": TaylorPruner,
    "movement": MovementPruner,
    "linear": LinearPruner,
    "agp": AGPPruner,
}
SCHEDULERS = {"linear", "agp"}
NEEDS_EVALUATOR = {"de_layerwise", "random_coarse", "de_channel", "slim", "taylor", "movement", "linear", "agp"}


def list_pruners() -> List[str]:
    return sorted(PRUNERS)


def create_pruner(name: str, model: nn.Module, config_list: List[Dict], evaluator=None, **options: Any):
    """Build an NNI pruner (ours or a built-in) by its lower-case name."""
    cls = lookup(PRUNERS, name, "NNI pruner")
    patch_lightning_evaluator()
    if name in NEEDS_EVALUATOR and evaluator is None:
        raise ValueError(f"pruner {name!r} needs an NNI evaluator (TorchEvaluator or LightningEvaluator)")
    if name in SCHEDULERS:
        inner_name = options.pop("pruner", "level")
        inner_options = options.pop("pruner_options", {})
        if inner_name in SCHEDULERS:
            raise ValueError(f"{name!r} schedules another pruner; {inner_name!r} is itself a scheduler")
        unknown = set(options) - {"interval_steps", "total_times"}
        if unknown:
            raise ValueError(f"unknown options for {name!r}: {sorted(unknown)}; valid: pruner, pruner_options, "
                             "interval_steps, total_times")
        if "interval_steps" not in options or "total_times" not in options:
            raise ValueError(f"{name!r} needs interval_steps and total_times (how often and how many times to prune)")
        inner = create_pruner(inner_name, model, config_list, evaluator, **inner_options)
        return cls(inner, options["interval_steps"], options["total_times"], evaluator=evaluator)
    if name in ("de_layerwise", "random_coarse", "de_channel"):
        return cls(model, config_list, evaluator, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    validated_entries(model, config_list, name, "{'op_types': ['Linear'], 'sparse_ratio': 0.5}")
    try:
        return cls(model, config_list, evaluator, **options) if evaluator is not None or name in NEEDS_EVALUATOR \
            else cls(model, config_list, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for NNI pruner {name!r}: {exc}") from None
