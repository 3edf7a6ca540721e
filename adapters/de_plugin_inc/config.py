"""INC configs: which layers an entry selects, what is wrong with it, and ``search_config``,
which runs the searches before training and writes one entry per layer with its searched target."""
from __future__ import annotations

import copy
import logging
import re
from typing import Any, Callable, Dict, List

from torch import nn

from .patterns import filter_pattern
from .search import DESettings, de_settings, search_channels, search_layer_targets

log = logging.getLogger("de_plugin_inc")
SPECIAL_NAMES = ("gpt", "retrain")


def validate_entry(info: Dict[str, Any], modules: Dict[str, nn.Module], need_eval: bool = True) -> DESettings:
    """Everything that can be wrong with a de_layerwise entry, raised before any training; its ``de_options``
    validated (the search takes that object)."""
    t = info.get("target_sparsity")
    if t is None or not 0.0 <= float(t) < 1.0:
        raise ValueError(f"target_sparsity must lie in [0, 1), got {t}")
    ev = info.get("eval_func")
    if need_eval and info.get("layer_targets") is None:
        if ev is None:
            raise ValueError("pruning_type='de_layerwise' needs 'eval_func' (a callable model -> accuracy) in its "
                             "pruning config entry, or precomputed 'layer_targets' (see de_plugin_inc.search_config)")
        if not callable(ev):
            raise TypeError(f"eval_func must be callable as eval_func(model) -> float, got {type(ev).__name__}")
    settings = de_settings(info.get("de_options"))
    if not modules:
        raise ValueError(f"op_names {info.get('op_names')} match no {info.get('pruning_op_types')} layer of the model "
                         "for de_layerwise (INC also leaves out the last Linear, the classifier)")
    for name in modules:
        if any(s in name for s in SPECIAL_NAMES):
            log.warning("layer %r: INC routes module names containing %s specially and may skip it", name, SPECIAL_NAMES)
    return settings


def selected_modules(info: Dict[str, Any], model: nn.Module) -> Dict[str, nn.Module]:
    """The layers INC would prune for a processed entry; ``info`` itself is left as it was (INC's
    ``parse_to_prune`` writes the classifier's name into the entry's exclusions)."""
    from neural_compressor.compression.pruner import utils

    return utils.parse_to_prune(dict(info), model)  # patched: gets its own exclusion list


def check_entry(model: nn.Module, info: Dict[str, Any], need_eval: bool = True,
                ) -> tuple[Dict[str, nn.Module], DESettings]:
    """Validate one processed pruning config entry; return the modules it selects and its search settings."""
    modules = selected_modules(info, model)
    return modules, validate_entry(info, modules, need_eval)


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
    """Run the searches before training; return a ``WeightPruningConfig`` with per-layer targets.

    ``random_coarse`` entries are resolved first (best of N filter masks, with ``train_data`` batches
    for adaptive BN and ``coarse_options``): one entry per layer with ``pattern="1x{kh*kw*C_in}"``,
    its ``target_sparsity`` and chosen filters (``channel_keep``). Then every ``de_layerwise`` entry
    becomes one entry per layer (anchored ``op_names``, INC's ``magnitude`` criterion, the layer's
    searched ``target_sparsity``). Other entries are kept. The model is not modified.
    """
    if not callable(eval_func):
        raise TypeError("eval_func must be callable as eval_func(model) -> float")
    config = _resolve(model, config, "random_coarse", lambda work, info, entry: _coarse_entries(
        work, info, entry, eval_func, train_data, coarse_options or {}))
    return _resolve(model, config, "de_layerwise", lambda work, info, entry: _de_entries(
        work, info, entry, eval_func, de_options))


def _resolve(model: nn.Module, config, kind: str, entries_for):
    """``config`` with every entry of ``pruning_type=kind`` replaced by ``entries_for(copy, info, entry)``."""
    from neural_compressor.compression.pruner.utils import process_config
    from neural_compressor.training import WeightPruningConfig

    glob = config.weight_compression.get("pruning_type")
    if not any(e.get("pruning_type", glob) == kind for e in config.pruning_configs):
        return config
    work = copy.deepcopy(model)
    entries: List[Dict[str, Any]] = []
    for info, entry in zip(process_config(config), list(config.pruning_configs)):
        entries += entries_for(work, info, entry) if info["pruning_type"] == kind else [dict(entry)]
    return WeightPruningConfig(pruning_configs=entries, **dict(config.weight_compression))


def _coarse_entries(work, info, entry, eval_func, train_data, coarse_options) -> List[Dict[str, Any]]:
    t = info.get("target_sparsity")
    if t is None or not 0.0 <= float(t) < 1.0:
        raise ValueError(f"random_coarse: target_sparsity (fraction of filters removed) must lie in [0, 1), got {t}")
    modules = {n: m for n, m in selected_modules(info, work).items() if isinstance(m, nn.Conv2d)}
    if not modules:
        raise ValueError(f"op_names {info.get('op_names')} select no Conv2d layer for random_coarse")
    keep = search_channels(work, {n: float(t) for n in modules}, eval_func,
                           {**(entry.get("coarse_options") or {}), **coarse_options}, train_data)
    return [per_layer_entry(entry, info, name, pruning_type="random_coarse", channel_keep=k,
                            pattern=filter_pattern(modules[name]), target_sparsity=1.0 - sum(k) / len(k))
            for name, k in keep.items()]


def _de_entries(work, info, entry, eval_func, de_options) -> List[Dict[str, Any]]:
    from neural_compressor.compression.pruner.patterns import get_pattern

    info["de_options"] = {**(info.get("de_options") or {}), **de_options}  # our processed copy, as below
    modules, settings = check_entry(work, info, need_eval=False)
    info["criterion_type"] = "magnitude"  # our processed copy, INC's DotDict kept
    targets = search_layer_targets(modules, get_pattern(info, modules), info["target_sparsity"],
                                   lambda: eval_func(work), settings,
                                   info["max_sparsity_ratio_per_op"], info["min_sparsity_ratio_per_op"])
    return [per_layer_entry(entry, info, name, pruning_type="magnitude", target_sparsity=ratio)
            for name, ratio in targets.items()]
