"""Where the DE runs for INC: per-layer sparsity targets scored with INC's own pattern.

A candidate (one sparsity per layer) becomes masks through INC's pattern object (``1x1``, ``4x1``,
``2:4``...), exactly as INC will prune, is applied to a copy of the weights, and scored by the
user's ``eval_func(model)``. The budget is exact in expectation: each candidate's per-layer
densities are scaled by one factor so the weights kept sum to ``(1 - target) * N``.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from torch import nn

from de_plugin import allocation
from de_plugin.de import DifferentialEvolution
from de_plugin.evaluation import make_backend
from de_plugin.layerwise import LayerwiseOptions, seed_population
from de_plugin.options import validate_options
from de_plugin.pruner import check_score

log = logging.getLogger("de_plugin_inc")
DE_KEYS = {"population", "generations", "max_evals", "strategy", "mutation", "recombination", "bound_handling",
           "seed_baselines", "perturb", "backend", "workers", "threads_per_worker", "ray_address"}


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


def de_settings(de_options: Dict[str, Any] | None) -> Dict[str, Any]:
    """Validate ``de_options`` with the core's option model; keep the keys the INC search uses."""
    opts = dict(de_options or {})
    seed = opts.pop("seed", 0)
    unused = sorted(set(opts) - DE_KEYS)
    if unused:
        import difflib

        hints = [f"{k!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, sorted(DE_KEYS), n=1))
                 else repr(k) for k in unused]
        raise ValueError(f"unknown de_options {', '.join(hints)}: inside INC only the search's options apply "
                         f"(INC's loop fine-tunes and schedules); valid: {sorted(DE_KEYS | {'seed'})}")
    o = validate_options(LayerwiseOptions, "de_layerwise", opts)
    return {**{k: getattr(o, k) for k in DE_KEYS}, "seed": int(seed)}


class PatternScorer:
    """Per-layer keep counts -> INC's own pattern masks on the layers -> ``eval_func()``; the
    scorer protocol of :mod:`de_plugin.evaluation`, so a generation can be scored by forked
    workers or Ray actors (``de_options={"backend": "process", "workers": 2}``)."""

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


def search_layer_targets(modules: Dict[str, nn.Module], pattern, target: float, eval_func: Callable[[], float],
                         de_options: Dict[str, Any] | None, max_ratio: float, min_ratio: float = 0.0,
                         ) -> Dict[str, float]:
    """Per-layer sparsities (same keys as ``modules``) maximising ``eval_func`` at overall ``target``."""
    s = de_settings(de_options)
    names = list(modules)
    weights = [modules[n].weight for n in names]
    numels = np.array([w.numel() for w in weights], dtype=np.int64)
    keep = int(round(numels.sum() * (1.0 - target)))
    lo = np.ceil(numels * (1.0 - max_ratio)).astype(np.int64)
    hi = np.floor(numels * (1.0 - min_ratio) + 1e-9).astype(np.int64)
    if keep < lo.sum() or keep > hi.sum():
        raise ValueError(f"target_sparsity {target} cannot be met within max/min_sparsity_ratio_per_op")
    scorer = PatternScorer(modules, pattern, eval_func)
    saved = scorer.saved
    backend = make_backend(s["backend"], scorer, s["workers"], s["threads_per_worker"], s["ray_address"])
    cache: Dict[tuple, float] = {}

    def ratios_of(counts: np.ndarray) -> np.ndarray:
        return 1.0 - counts / numels

    def score_many(batch: List[np.ndarray]) -> List[float]:
        keys = [tuple(int(c) for c in counts) for counts in batch]
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        if todo:
            cache.update(zip(todo, backend.evaluate([np.array(k) for k in todo])))
        return [cache[k] for k in keys]

    fit = lambda d: allocation.fit_budget(d, numels, keep, lo, upper=hi)  # noqa: E731
    seeds = [fit(np.full(len(names), 1.0 - target))]
    if s["seed_baselines"]:
        for rule in allocation.ALLOCATIONS.values():
            seeds.append(fit(rule([w.detach() for w in saved], target) / numels))
    bounds = [(1.0 - h / n, 1.0 - l / n) for l, h, n in zip(lo, hi, numels)]
    rng = np.random.default_rng(s["seed"])
    x0 = seed_population([ratios_of(c) for c in seeds], bounds, s["population"], s["perturb"], rng)
    solver = DifferentialEvolution(bounds, popsize=s["population"], strategy=s["strategy"], mutation=s["mutation"],
                                   recombination=s["recombination"], maxiter=s["generations"], maxfun=s["max_evals"],
                                   bound_handling=s["bound_handling"], x0=x0,
                                   seed=int(rng.integers(2**31)))
    try:
        backend.start_round()
        while not solver.done:
            xs = solver.ask()
            counts = [fit(1.0 - x) for x in xs]
            solver.tell([-v for v in score_many(counts)], None, np.array([ratios_of(c) for c in counts]))
        backend.end_round()
    finally:
        backend.close()
    best = fit(1.0 - solver.population[solver.best_index()])
    log.info("de_layerwise (INC): %d evaluations, best val %.4f", len(cache), -solver.fun[solver.best_index()])
    return {n: float(r) for n, r in zip(names, ratios_of(best))}


#: keys of a user's entry that only drive the search; the per-layer entries replace them
SEARCH_ONLY = ("op_names", "pruning_type", "eval_func", "de_options", "coarse_options", "train_data",
               "target_sparsity", "pattern")
#: settings a per-layer entry takes from the processed config when the user's entry left them global
INHERITED = ("pattern", "start_step", "end_step", "pruning_frequency", "pruning_scope", "sparsity_decay_type",
             "pruning_op_types", "excluded_op_names")


def per_layer_entry(entry: Dict[str, Any], info: Dict[str, Any], name: str, **settings: Any) -> Dict[str, Any]:
    """One layer's INC entry after a search: the user's entry without its search-only keys, anchored
    to ``name`` (INC's op_names are unanchored regexes), with ``settings`` (its searched target...)
    and the schedule it inherited; ``max_sparsity_ratio_per_op`` is raised to the target if needed."""
    e = {k: v for k, v in entry.items() if k not in SEARCH_ONLY}
    e.update(op_names=[f"^{re.escape(name)}$"], **settings)
    e["max_sparsity_ratio_per_op"] = max(settings["target_sparsity"], info["max_sparsity_ratio_per_op"])
    for key in INHERITED:
        e.setdefault(key, info.get(key))
    return e


def search_config(model: nn.Module, config, eval_func: Callable[[nn.Module], float], *,
                  train_data: List[Any] | None = None, coarse_options: Dict[str, Any] | None = None,
                  **de_options: Any):
    """Run the search before training; return a ``WeightPruningConfig`` with per-layer targets.

    ``random_coarse`` entries are resolved first (:func:`de_plugin_inc.coarse.search_config`, with
    ``train_data`` batches for adaptive BN and ``coarse_options``), then ``de_layerwise`` ones.

    Every entry of ``config`` with ``pruning_type="de_layerwise"`` becomes one entry per layer
    (anchored ``op_names``, INC's ``magnitude`` criterion, the layer's searched
    ``target_sparsity``); other entries are kept. The model is not modified.
    """
    from neural_compressor.compression.pruner.patterns import get_pattern
    from neural_compressor.compression.pruner.utils import process_config
    from neural_compressor.training import WeightPruningConfig

    from .pruner import check_entry

    if not callable(eval_func):
        raise TypeError("eval_func must be callable as eval_func(model) -> float")
    if any(e.get("pruning_type", config.weight_compression.get("pruning_type")) == "random_coarse"
           for e in config.pruning_configs):
        from .coarse import search_config as coarse_search_config

        config = coarse_search_config(model, config, eval_func, train_data, **(coarse_options or {}))
    work = copy.deepcopy(model)
    entries: List[Dict[str, Any]] = []
    infos = process_config(config)
    raw = list(config.pruning_configs)
    for info, entry in zip(infos, raw):
        if info["pruning_type"] != "de_layerwise":
            entries.append(dict(entry))
            continue
        modules = check_entry(work, info, need_eval=False)
        info["criterion_type"] = "magnitude"  # our processed copy, INC's DotDict kept
        pattern = get_pattern(info, modules)
        targets = search_layer_targets(modules, pattern, info["target_sparsity"], lambda: eval_func(work),
                                       {**(info.get("de_options") or {}), **de_options},
                                       info["max_sparsity_ratio_per_op"], info["min_sparsity_ratio_per_op"])
        entries += [per_layer_entry(entry, info, name, pruning_type="magnitude", target_sparsity=ratio)
                    for name, ratio in targets.items()]
    return WeightPruningConfig(pruning_configs=entries, **dict(config.weight_compression))
