"""Where the searches run for INC: the core's allocator over INC's pattern masks (``de_layerwise``)
the core's coarse search over whole filters (``random_coarse``) and its channel-count search under a
MACs / parameter budget (``de_channel``).

``de_layerwise``: a candidate (one sparsity per layer) is projected onto the exact budget (its
per-layer densities scaled by one factor so the weights kept sum to ``(1 - target) * N``), becomes
masks through INC's pattern (:func:`~de_plugin_inc.patterns.inc_scorer`; on INC 3.8+ the core's patterns) and is scored by the
user's ``eval_func(model)``. ``random_coarse``: the best of N random filter masks at each layer's ratio.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from torch import nn

from de_plugin.adapter import (
    ChannelOptions,
    CoarseOptions,
    CoarseSpace,
    DensitySpace,
    GroupedSpace,
    LayerwiseOptions,
    SearchOptions,
    Target,
    allocation,
    backend_round,
    capture_input,
    check_batches,
    check_score,
    coarse_search,
    make_backend,
    prune,
    resolve_groups,
    start_search,
    validate_options,
)

from .patterns import inc_scorer

log = logging.getLogger("de_plugin_inc")
DE_KEYS = {"population", "generations", "max_evals", "strategy", "mutation", "recombination", "bound_handling",
           "seed_baselines", "perturb", "backend", "workers", "threads_per_worker", "ray_address", "ray_runtime_env", "adaptation",
           "stall"}
GROUP_KEYS = {"groups": "layer", "group_offset": 0.05}  # the grouped search of de_layerwise (deep models)
COARSE_KEYS = {"candidates", "adaptive_bn", "bn_batches", "score", "seed"}


@dataclass(frozen=True)
class DESettings:
    """``de_options`` validated: the core's search options plus the grouped search's settings and the seed.
    Built once per INC entry or config (before any work) and handed to the search as it is."""

    search: SearchOptions
    groups: Any
    group_offset: float
    seed: int


def de_settings(de_options: "Dict[str, Any] | DESettings | None") -> DESettings:
    """Validate ``de_options`` with the core's option models; keep the keys the INC search uses. Settings
    validated already are returned as they are."""
    if isinstance(de_options, DESettings):
        return de_options
    if de_options is not None and not isinstance(de_options, dict):
        raise TypeError(f"de_options must be a dict of search options, e.g. {{'population': 8, 'generations': 5}}; "
                        f"got {type(de_options).__name__} {de_options!r}")
    opts = dict(de_options or {})
    seed = opts.pop("seed", 0)
    grouping = {k: opts.pop(k, v) for k, v in GROUP_KEYS.items()}
    validate_options(LayerwiseOptions, "de_layerwise", grouping)
    unused = sorted(set(opts) - DE_KEYS)
    if unused:
        import difflib

        hints = [f"{k!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, sorted(DE_KEYS), n=1))
                 else repr(k) for k in unused]
        raise ValueError(f"unknown de_options {', '.join(hints)}: inside INC only the search's options apply "
                         f"(INC's loop fine-tunes and schedules); valid: {sorted(DE_KEYS | set(GROUP_KEYS) | {'seed'})}")
    # early rejection compares against a reference accuracy, which INC's search does not take
    o = validate_options(SearchOptions, "de_layerwise", {**opts, "early_reject": False})
    return DESettings(o, grouping["groups"], grouping["group_offset"], int(seed))


def search_layer_targets(modules: Dict[str, nn.Module], pattern, target: float, eval_func: Callable[[], float],
                         de_options: "Dict[str, Any] | DESettings | None", max_ratio: float, min_ratio: float = 0.0,
                         ) -> Dict[str, float]:
    """Per-layer sparsities (same keys as ``modules``) maximising ``eval_func`` at overall ``target``,
    scored on INC 3.7's own pattern masks."""
    return search_targets(inc_scorer(modules, pattern, eval_func), modules, target, de_options, max_ratio, min_ratio)


def search_targets(scorer, modules: Dict[str, nn.Module], target: float,
                   de_options: "Dict[str, Any] | DESettings | None", max_ratio: float, min_ratio: float = 0.0,
                   ) -> Dict[str, float]:
    """The DE search over per-layer sparsities with ``scorer`` (a ``PatternScorer``): both INC routes."""
    s = de_settings(de_options)
    names = list(modules)
    numels = np.array([modules[n].weight.numel() for n in names], dtype=np.int64)
    keep = int(round(numels.sum() * (1.0 - target)))
    lo = np.ceil(numels * (1.0 - max_ratio)).astype(np.int64)
    hi = np.floor(numels * (1.0 - min_ratio) + 1e-9).astype(np.int64)
    if keep < lo.sum() or keep > hi.sum():
        raise ValueError(f"target_sparsity {target} cannot be met within max/min_sparsity_ratio_per_op")
    base = DensitySpace(numels, lo, hi, [(1.0 - h / n, 1.0 - l / n) for l, h, n in zip(lo, hi, numels)])
    targets = [Target(n, "weight", type(modules[n]).__name__, tuple(modules[n].weight.shape)) for n in names]
    groups = resolve_groups(s.groups, targets)
    space = GroupedSpace(base, [g for _, g in groups], s.group_offset) if groups else base
    o = s.search
    backend = make_backend(o.backend, scorer, o.workers, o.threads_per_worker, o.ray_address,
                           runtime_env=o.ray_runtime_env)
    try:
        with backend_round(backend) as scorer:
            seeds = [space.fit(np.full(len(names), 1.0 - target), keep, is_density=True)]
            if o.seed_baselines:
                for rule in allocation.rules().values():
                    seeds.append(space.fit(rule([w.detach() for w in scorer.saved], target) / numels, keep,
                                           is_density=True))
            search, solver = start_search(backend, o, np.random.default_rng(s.seed), space, seeds,
                                          o.max_evals, progress=True)  # a bar on a TTY
            best = search.maximise(solver, space, keep)
    finally:
        backend.close()
    log.info("de_layerwise (INC): %d evaluations, best val %.4f", len(search.cache), -solver.fun[solver.best_index()])
    return {n: float(r) for n, r in zip(names, base.to_x(best))}


def coarse_settings(options: Optional[Dict[str, Any]]) -> tuple[CoarseOptions, int]:
    """Validate ``coarse_options`` (feature-map ratios come from target_sparsity)."""
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"coarse_options must be a dict, e.g. {{'candidates': 20}}; got {type(options).__name__} "
                        f"{options!r}")
    opts = dict(options or {})
    seed = int(opts.pop("seed", 0))
    bad = sorted(set(opts) - COARSE_KEYS)
    if bad:
        raise ValueError(f"unknown coarse_options {bad}: inside INC the ratio is target_sparsity and INC's loop "
                         f"retrains; valid: {sorted(COARSE_KEYS)}")
    return validate_options(CoarseOptions, "random_coarse", {**opts, "finetune_epochs": 0}), seed


def search_channels(model: nn.Module, layers: Dict[str, float], eval_func: Callable[[nn.Module], float],
                    options: Optional[Dict[str, Any]] = None, train_data: Optional[List[Any]] = None,
                    ) -> Dict[str, List[bool]]:
    """Best of N random feature-map masks at the given per-layer ratios: kept filters per layer."""
    o, seed = coarse_settings(options)
    if train_data is not None:
        train_data = check_batches(train_data, "train_data", pairs=False)
    o.ratios = dict(layers)
    o.feature_map_ratio = 0.0
    example, _ = capture_input(model, lambda: check_score(eval_func(model)))
    space = CoarseSpace(model, example, list(layers), o)
    missing = sorted(set(layers) - {p for g in space.groups for p in g.producers})
    if missing:
        raise ValueError(f"layers {missing} have no prunable feature maps (they reach the output, or share channels "
                         f"with a layer that is not selected: select all coupled layers together)")
    found = coarse_search(model, space, example, lambda m: eval_func(m), o, seed, train_batches=train_data,
                          progress=False)
    log.info("random_coarse (INC): best of %d candidates, val %.4f", len(found.scores), found.score)
    keep = found.channel_keep()
    return {n: [bool(v) for v in keep[n]] for n in layers}


#: ChannelOptions that make no sense inside INC's loop (INC schedules and retrains; the search gets no
#: finetune callable, so the finalists' short retraining cannot run either)
CHANNEL_OWNED = {"rounds", "finetune_epochs", "checkpoint", "resume", "channel_choice", "candidates", "finalists",
                 "finalist_epochs"}


def channel_settings(options: Optional[Dict[str, Any]]) -> tuple[Dict[str, Any], int]:
    """Validate ``channel_options`` (the budget, e.g. ``{"macs": 0.5}``, and search settings)."""
    if not isinstance(options, dict):
        raise ValueError("pruning_type='de_channel' needs channel_options with its budget, e.g. "
                         f"{{'macs': 0.5}} (fraction of the dense MACs kept); got {options!r}")
    opts = dict(options)
    seed = int(opts.pop("seed", 0))
    bad = sorted(set(opts) & CHANNEL_OWNED)
    if bad:
        raise ValueError(f"channel_options {bad}: inside INC one search runs at the first pruning step and INC's loop "
                         "retrains; drop them")
    validate_options(ChannelOptions, "de_channel", opts)
    return opts, seed


def search_channel_counts(model: nn.Module, layers: List[str], eval_func: Callable[[nn.Module], float],
                          options: Dict[str, Any], train_data: Optional[List[Any]] = None) -> Dict[str, List[bool]]:
    """``de_channel``'s search on a copy of ``model`` (one round, no retraining: INC's loop retrains):
    the kept filters per layer under the budget of ``options``."""
    opts, seed = channel_settings(options)
    r = prune(model, "de_channel", evaluate=lambda m: check_score(eval_func(m)), finetune=None, layers=list(layers),
              train_data=None if train_data is None else check_batches(train_data, "train_data", pairs=False),
              seed=seed, progress=False, **{**opts, "rounds": 1, "finetune_epochs": 0})
    log.info("de_channel (INC): %d evaluations, val %.4f, MACs kept %.3f, parameters kept %.3f", r.nfev,
             r.history[-1]["val_accuracy_before_finetune"], r.extra["macs_kept"], r.extra["params_kept"])
    keep = {}
    for n in layers:
        m = r.extra_masks.get(f"{n}.weight")
        keep[n] = [True] * model.get_submodule(n).weight.shape[0] if m is None else m.flatten(1).any(1).tolist()
    return keep
