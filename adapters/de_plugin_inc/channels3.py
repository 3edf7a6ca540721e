"""``de_channel`` for INC 3.8+: channel counts searched under a MACs / parameter / latency budget, the
channels physically removed, then (through :func:`de_plugin_inc.prune_and_quantize`) INC's int8.

Registered in INC 3.x's registries like :class:`~de_plugin_inc.inc3.DELayerwiseConfig`:

    smaller = quantize(model, DEChannelConfig(macs=0.5, eval_fn=evaluate, train_data=batches))
    q = prune_and_quantize(model, DEChannelConfig(macs=0.5, ...), StaticQuantConfig(), example_inputs=(x,), calib_data=b)

One search round (INC has no training loop; ``finetune_fn(model)`` runs on the smaller model if given),
then the core's slicing makes every coupled conv / BatchNorm / consumer smaller, output-equal to the
masked model. The report gives MACs and parameters before and after.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence

from neural_compressor.common.base_config import register_config
from neural_compressor.common.utils import Mode
from torch import nn

from de_plugin.adapter import capture_input, check_batches, check_score, count_macs, prune, slice_channels

from .config3 import PruningConfig
from .search import channel_settings

log = logging.getLogger("de_plugin_inc")
DE_CHANNEL = "de_channel"


@register_config(framework_name="torch", algo_name=DE_CHANNEL, priority=0)
class DEChannelConfig(PruningConfig):
    """INC 3.x config of ``de_channel``: exactly one budget (``macs``, ``params`` or ``latency``, fractions
    of the dense model kept); ``channel_options`` takes the search's settings (population, generations,
    channel_choice, include_linear, bn_batches, backend...). A list for the budget makes it tunable."""

    name = DE_CHANNEL
    non_tunable_params = ["white_list", "eval_fn", "train_data", "layers", "channel_options", "finetune_fn"]

    def __init__(self, macs: Optional[float] = None, params: Optional[float] = None, latency: Optional[float] = None,
                 eval_fn: Optional[Callable] = None, train_data: Optional[Sequence] = None,
                 layers: Optional[Sequence[str]] = None, channel_options: Optional[Dict[str, Any]] = None,
                 finetune_fn: Optional[Callable] = None, white_list=None, **kwargs):
        super().__init__(white_list=white_list)
        self.macs, self.params, self.latency = macs, params, latency
        self.eval_fn, self.train_data, self.layers = eval_fn, train_data, layers
        self.channel_options, self.finetune_fn = channel_options, finetune_fn
        self.non_tunable_params = list(type(self).non_tunable_params)
        self._post_init()

    @staticmethod
    def get_model_info(model: nn.Module, *args, **kwargs):
        return [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    @classmethod
    def get_config_set_for_tuning(cls) -> "DEChannelConfig":
        return cls(macs=[0.7, 0.5])

    def settings(self) -> Dict[str, Any]:
        """The core's de_channel options (one round, no retraining), validated; raised before any work."""
        if not callable(self.eval_fn):
            raise ValueError("DEChannelConfig needs eval_fn: a function model -> validation accuracy (higher is "
                             "better) that the search scores candidates with")
        budget = {k: v for k, v in (("macs", self.macs), ("params", self.params), ("latency", self.latency))
                  if v is not None}
        if any(isinstance(v, (list, tuple)) for v in budget.values()):
            raise ValueError(f"the budget must be one number here (a list is for autotune), got {budget}")
        opts, seed = channel_settings({**(self.channel_options or {}), **budget})
        if self.train_data is not None:
            check_batches(self.train_data, "train_data", pairs=False)
        return {**opts, "seed": seed}

    def check(self, model: nn.Module) -> Dict[str, Any]:
        """As :meth:`settings` (the layers are checked by the search's coupling pass)."""
        return self.settings()


def prune_channels(model: nn.Module, config: DEChannelConfig) -> Dict[str, Any]:
    """Search, then slice ``model`` in place (it becomes physically smaller); the MACs / parameter report."""
    opts = config.settings()
    seed = opts.pop("seed")
    example, _ = capture_input(model, lambda: check_score(config.eval_fn(model)))
    before = count_macs(model, example)
    r = prune(model, "de_channel", evaluate=lambda m: check_score(config.eval_fn(m)), finetune=None,
              layers=None if config.layers is None else list(config.layers), inplace=True, seed=seed, progress=False,
              train_data=None if config.train_data is None else check_batches(config.train_data, "train_data",
                                                                                pairs=False),
              **{**opts, "rounds": 1, "finetune_epochs": 0})
    slice_channels(model, example, r.extra_masks)
    after = count_macs(model, example)
    if config.finetune_fn is not None:
        config.finetune_fn(model)
    report = {"macs_before": before["macs_dense"], "macs_after": after["macs_dense"],
              "params_before": before["params_dense"], "params_after": after["params_dense"],
              "macs_kept": after["macs_dense"] / before["macs_dense"],
              "params_kept": after["params_dense"] / before["params_dense"], "nfev": r.nfev}
    model.de_plugin_report = report
    log.info("de_channel (INC 3.x): MACs %d -> %d (%.3f), parameters %d -> %d (%.3f)", report["macs_before"],
             report["macs_after"], report["macs_kept"], report["params_before"], report["params_after"],
             report["params_kept"])
    return report


def de_channel_entry(model: nn.Module, configs_mapping, mode: Mode = Mode.QUANTIZE, *args, **kwargs) -> nn.Module:
    """INC's algorithm entry: searches and slices at ``quantize`` and ``prepare``."""
    config = next(c for c in configs_mapping.values() if getattr(c, "name", None) == DE_CHANNEL)
    if mode != Mode.CONVERT:
        prune_channels(model, config)
    return model
