"""Pruners by name for NNI 3.0, which has no registry of its own.

``create_pruner("de_layerwise" | "level" | "l1norm" | ... , model, config_list, evaluator, **options)``.
The names are NNI's own pruners plus every pruner in the core's registry that this adapter can run
(``random_coarse``, ``de_channel`` and every keep-count pruner: ``de_layerwise``, the baselines and
third parties' plugins registered through the ``de_plugin`` hooks), looked up when asked, so a
plugin installed later is selectable in an NNI config without a change here.
Schedulers (``linear``, ``agp``) wrap another pruner named by ``options["pruner"]`` (default
``level``) with ``options["pruner_options"]``, and take ``interval_steps`` / ``total_times``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
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

from de_plugin.adapter import IterativePruner, get_pruner_class, lookup
from de_plugin.adapter import list_pruners as core_pruners

from .entries import validated_entries
from .evaluators import patch_lightning_evaluator
from .channel import DEChannelPruner
from .coarse import RandomCoarsePruner
from .pruner import weight_pruner

log = logging.getLogger("de_plugin_nni")
#: core pruners with an NNI class of their own (channel and kernel masks, not per-layer weight counts)
STRUCTURED: Dict[str, type] = {"random_coarse": RandomCoarsePruner, "de_channel": DEChannelPruner}
NNI_PRUNERS: Dict[str, type] = {
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
NNI_NEEDS_EVALUATOR = {"slim", "taylor", "movement", "linear", "agp"}


def core_table() -> Dict[str, type]:
    """The core's registered pruners this adapter runs, by name, each with its NNI class; a core name
    that is also one of NNI's is left to NNI (warned once)."""
    out: Dict[str, type] = {}
    for name in core_pruners():
        if name in NNI_PRUNERS:
            if name not in _shadowed:
                _shadowed.add(name)
                log.warning("core pruner %r has the name of NNI's own pruner; in NNI configs the name means NNI's", name)
            continue
        if name in STRUCTURED:
            out[name] = STRUCTURED[name]
        elif issubclass(get_pruner_class(name), IterativePruner):
            out[name] = weight_pruner(name)
    return out


_shadowed: set = set()


class _Pruners(Mapping):
    """``PRUNERS``: NNI's pruners and the core's, read from the core registry at every lookup."""

    def _table(self) -> Dict[str, type]:
        return {**core_table(), **NNI_PRUNERS}

    def __getitem__(self, name: str) -> type:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


PRUNERS = _Pruners()


def list_pruners() -> List[str]:
    return sorted(PRUNERS)


def core_weight_pruner(name: str) -> bool:
    """Whether ``name`` is a core pruner of per-layer weight counts (``de_layerwise``, the baselines, plugins)."""
    cls = core_table().get(name)
    return cls is not None and name not in STRUCTURED


def create_pruner(name: str, model: nn.Module, config_list: List[Dict], evaluator=None, **options: Any):
    """Build an NNI pruner (ours or a built-in) by its lower-case name."""
    core = core_table()
    cls = lookup({**core, **NNI_PRUNERS}, name, "NNI pruner")
    patch_lightning_evaluator()
    needs_evaluator = name in core or name in NNI_NEEDS_EVALUATOR
    if needs_evaluator and evaluator is None:
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
    if name in core:
        return cls(model, config_list, evaluator, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    validated_entries(model, config_list, name, "{'op_types': ['Linear'], 'sparse_ratio': 0.5}")
    try:
        return cls(model, config_list, evaluator, **options) if evaluator is not None or needs_evaluator \
            else cls(model, config_list, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for NNI pruner {name!r}: {exc}") from None
