"""``pruning_type="de_layerwise"`` and ``"random_coarse"`` inside INC's loop (registered as
``pt_de_layerwise`` / ``pt_random_coarse``).

INC resolves a pruning_type that is not a criterion to ``PRUNERS["pt_" + name]``. Our pruner is
INC's basic pruner (its pattern, scheduler, magnitude criterion and mask application) with one
change: every layer gets its own target. At the first pruning step the DE search
(:mod:`de_plugin_inc.search`) allocates the entry's ``target_sparsity`` over its layers with the
user's ``eval_func`` (a key of the pruning config entry, with ``de_options``); or the entry gives
``layer_targets`` directly. At each scheduled step layer l is pruned to
``target_l * current / target`` with INC's pattern, so it ends exactly at its searched target.

``random_coarse`` is INC's whole-filter pattern (``1x{kh*kw*C_in}`` or ``1xchannel``): its filter
scores are the kept filters of the best random mask, searched at the first pruning step by the
core's coarse search (coupled channels together, adaptive BN, the entry's ``eval_func``) or given
up front as ``channel_keep`` by :func:`de_plugin_inc.search_config`. INC masks conv weights only:
BatchNorm and the consumers of removed maps are not masked by INC.

Quirk (INC 3.7.1): the basic pruner clips every layer to the pruner's single target ratio; we
call the pattern per layer with that layer's ratio instead.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch
from neural_compressor.compression.pruner.pruners.base import register_pruner
from neural_compressor.compression.pruner.pruners.basic import PytorchBasicPruner
from torch import nn

from de_plugin.adapter import check_batches

from .config import validate_entry
from .patterns import check_pattern, layer_mask
from .search import channel_settings, coarse_settings, search_channel_counts, search_channels, search_layer_targets

log = logging.getLogger("de_plugin_inc")


class _Quiet:
    """Batches that INC's ``logger.info(info)`` prints as one short line (INC pretty-prints lists
    element by element, so this is no list; it iterates like one)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __repr__(self) -> str:
        return f"<{len(self.batches)} batches>"


class _ModelRef:
    """Holds the model for the pruner without dumping it into INC's logs (``logger.info(info)``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __repr__(self) -> str:
        return f"<model {type(self.model).__name__}>"


def _patch_generate_pruners() -> None:
    """Quirk (INC 3.7.1): a pruner sees only its modules, never the model, but ``eval_func(model)``
    needs it; hand the model to de_layerwise entries before INC builds their pruners. Both routes
    are patched: ``prepare_pruning`` (BasePruning) and ``prepare_compression`` (PruningCallbacks).
    Idempotent."""
    from neural_compressor.compression import callbacks
    from neural_compressor.compression.pruner import pruning

    routes = ((pruning.BasePruning, lambda self: self._model),
              (callbacks.PruningCallbacks, lambda self: self.model.model))
    for cls, get_model in routes:
        original = cls._generate_pruners
        if getattr(original, "_de_plugin", False):
            continue

        def _generate_pruners(self, _original=original, _get_model=get_model):
            for info in self.pruners_info:
                if info.get("pruning_type") in ("de_layerwise", "random_coarse", "de_channel"):
                    info["model_ref"] = _ModelRef(_get_model(self))
                    if info.get("train_data") is not None and not isinstance(info["train_data"], _Quiet):
                        # INC logs every entry at INFO (``logger.info(info)``): not every batch, please
                        info["train_data"] = _Quiet(check_batches(info["train_data"], "train_data", pairs=False))
            return _original(self)

        _generate_pruners._de_plugin = True
        cls._generate_pruners = _generate_pruners


def _patch_process_config() -> None:
    """Quirk (INC 3.7.1): a target_sparsity outside [0, 1) fails deep in INC with a misleading
    "begin_pruning_step should be in range [0,1)"; check de_layerwise entries first. Idempotent."""
    from neural_compressor.compression import callbacks
    from neural_compressor.compression import pruner as pruner_pkg

    def checked(original):
        if getattr(original, "_de_plugin", False):
            return original

        def process_config(config):
            glob = getattr(config, "weight_compression", {}) or {}
            for entry in getattr(config, "pruning_configs", None) or []:
                kind = entry.get("pruning_type", glob.get("pruning_type"))
                if kind in ("de_layerwise", "random_coarse", "de_channel"):
                    t = entry.get("target_sparsity", glob.get("target_sparsity"))
                    if t is None or not 0.0 <= float(t) < 1.0:
                        raise ValueError(f"{kind}: target_sparsity must lie in [0, 1), got {t}")
            return original(config)

        process_config._de_plugin = True
        return process_config

    callbacks.process_config = checked(callbacks.process_config)
    pruner_pkg.process_config = checked(pruner_pkg.process_config)


def _patch_parse_to_prune() -> None:
    """Quirk (INC 3.7.1): ``parse_to_prune`` appends the classifier's name to the entry's
    ``excluded_op_names`` in place, and that list is often ``WeightPruningConfig``'s shared mutable
    default: after one model with a head named ``fc`` was pruned, every later config in the process
    excludes ``fc1``, ``fc2``... (unanchored regex). Give each call its own list. Idempotent."""
    from neural_compressor.compression import callbacks
    from neural_compressor.compression.pruner import pruning, utils

    original = utils.parse_to_prune
    if getattr(original, "_de_plugin", False):
        return

    def parse_to_prune(config, model):
        config["excluded_op_names"] = list(config.get("excluded_op_names") or [])
        return original(config, model)

    parse_to_prune._de_plugin = True
    for mod in (utils, callbacks, pruning):
        mod.parse_to_prune = parse_to_prune


class _QuietINC(logging.Filter):
    """Quirk (INC 3.7.1): ``process_config`` warns "<key> is not supported for config" for the keys
    our pruners read (they are used), and every pattern step logs "<layer> sparsity is ..." at INFO
    (hundreds of lines per run). Drop those two; everything else INC says passes."""

    OURS = ("eval_func", "de_options", "coarse_options", "train_data", "layer_targets", "channel_keep", "model_ref")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.endswith(" is not supported for config") and msg.split(" ", 1)[0] in self.OURS:
            return False
        return not (record.levelno == logging.INFO and " sparsity is " in msg)


def _quiet_inc_logger() -> None:
    inc_log = logging.getLogger("neural_compressor")
    if not any(isinstance(f, _QuietINC) for f in inc_log.filters):
        inc_log.addFilter(_QuietINC())


_patch_generate_pruners()
_patch_process_config()
_patch_parse_to_prune()
_quiet_inc_logger()


class SearchedPruner(PytorchBasicPruner):
    """INC's basic pruner whose per-layer masks follow a search run once, at the first pruning
    step (unless its result came in the config); INC's scheduler ramps the sparsity as usual."""

    label = "searched"

    def searched(self) -> bool:
        raise NotImplementedError

    def _search(self) -> None:
        raise NotImplementedError

    def step_masks(self, current: float) -> bool:
        """Set ``self.masks`` for this step's overall ratio ``current``; False when nothing changes."""
        raise NotImplementedError

    def update_masks(self, local_step):
        if self.global_step == self.start_step and self.config["lock_init_sparsity"]:  # as INC's basic pruner
            self.masks = self.pattern.get_pattern_lock_masks(self.modules)
            self.init_sparsity_ratio = self.pattern.get_sparsity_ratio(self.masks)
            self.current_sparsity_ratio = self.init_sparsity_ratio
        if not self.check_is_pruned_step(self.global_step):
            return
        if not self.searched():
            if getattr(self, "_searching", False):
                # Quirk (INC 3.7.1, prepare_pruning): INC's forward pre-hook calls on_step_begin on every
                # forward, so the search's own eval_func(model) would re-enter the search (RecursionError)
                return
            self._searching = True
            try:
                self._search()
            finally:
                self._searching = False
        if self.current_sparsity_ratio > self.target_sparsity_ratio:
            return
        current = self.scheduler.update_sparsity_ratio(self.target_sparsity_ratio, self.completed_pruned_cnt,
                                                       self.total_prune_cnt, self.masks, self.init_sparsity_ratio)
        self.completed_pruned_cnt += 1
        if not self.step_masks(current):
            return
        self.mask_weights()
        self.current_sparsity_ratio = self.pattern.get_sparsity_ratio(self.masks)
        log.info("%s step %d: overall sparsity %.4f", self.label, self.global_step, self.current_sparsity_ratio)


@register_pruner("pt_de_layerwise")
class PytorchDELayerwisePruner(SearchedPruner):
    """INC's basic pruner with per-layer targets searched by DE."""

    label = "de_layerwise"

    def __init__(self, config, modules):
        config["criterion_type"] = "magnitude"  # de_layerwise prunes by magnitude inside each layer
        self.settings = validate_entry(config, modules)
        targets = config.get("layer_targets")
        super().__init__(config, modules)
        if targets is not None and set(targets) != set(modules):
            raise ValueError(f"layer_targets names {sorted(targets)} differ from the selected layers {sorted(modules)}")
        self.layer_targets: Dict[str, float] | None = dict(targets) if targets else None

    def _search(self) -> None:
        ev = self.config["eval_func"]
        ref = self.config.get("model_ref")
        fn = (lambda: ev(ref.model)) if ref is not None else (lambda: ev())
        self.layer_targets = search_layer_targets(
            self.modules, self.pattern, self.target_sparsity_ratio, fn, self.settings,
            self.config["max_sparsity_ratio_per_op"], self.config["min_sparsity_ratio_per_op"])
        log.info("de_layerwise per-layer targets: %s", self.layer_targets)

    def searched(self) -> bool:
        return self.layer_targets is not None

    def step_masks(self, current: float) -> bool:
        self.criterion.on_step_begin()
        if self.criterion.scores == {}:
            return False
        scale = current / self.target_sparsity_ratio if self.target_sparsity_ratio > 0 else 0.0
        for name in self.modules:
            ratio = min(self.layer_targets[name] * scale, self.layer_targets[name])
            self.masks[name] = layer_mask(self.pattern, name, self.criterion.scores[name], ratio,
                                          self.layer_targets[name], self.masks[name])
        return True


@register_pruner("pt_random_coarse")
class PytorchRandomCoarsePruner(SearchedPruner):
    """INC's basic pruner whose filter scores are the kept filters of the best random mask."""

    label = "random_coarse"

    def __init__(self, config, modules):
        config["criterion_type"] = "magnitude"
        if not modules:
            raise ValueError(f"random_coarse: op_names {config.get('op_names')} matched no Conv2d layer of the model "
                             "(INC's op_names are regular expressions over module names; INC also leaves out the "
                             "last layer)")
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


@register_pruner("pt_de_channel")
class PytorchDEChannelPruner(PytorchRandomCoarsePruner):
    """INC's basic pruner whose filter scores are the channels ``de_channel`` keeps under a MACs /
    parameter budget (``channel_options={"macs": 0.5}``); ``target_sparsity`` only shapes INC's ramp:
    each layer reaches its searched ratio when INC's schedule reaches ``target_sparsity``."""

    label = "de_channel"

    def __init__(self, config, modules):
        channel_settings(config.get("channel_options"))
        if not callable(config.get("eval_func")):
            raise ValueError("pruning_type='de_channel' needs 'eval_func' (model -> accuracy) in its pruning config "
                             "entry")
        PytorchRandomCoarsePruner.__init__(self, config, modules)

    def _search(self) -> None:
        ref = self.config.get("model_ref")
        if ref is None:
            raise ValueError("de_channel needs the model: use INC's prepare_pruning / prepare_compression")
        self.channel_keep = search_channel_counts(ref.model, list(self.modules), self.config["eval_func"],
                                                  self.config["channel_options"], self.config.get("train_data"))
