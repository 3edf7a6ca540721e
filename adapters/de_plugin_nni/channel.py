"""``DEChannelPruner``: the core's ``de_channel`` as an NNI 3.0 ``Pruner``.

``DEChannelPruner(model, config_list, evaluator, macs=0.5, rounds=2, ...)``. The config_list entries
select the Conv2d (and with ``include_linear=True`` Linear) layers as NNI does; how many channels
each coupled group keeps is what the search decides, so entries carry no ``sparse_ratio``: the
budget is the ``macs=`` / ``params=`` option (fraction of the dense model's cost kept).
``compress()`` runs the core's rounds with ``evaluator.evaluate()`` as the score and
``evaluator.train(max_epochs=finetune_epochs)`` as the retraining, adaptive BN on ``train_data`` or
the evaluator's own training inputs, and puts each layer's removed output channels into NNI's
wrappers, so ``de_plugin_nni.speedup`` (NNI's ``ModelSpeedup``, or the core's slicing) builds the
smaller model.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
from nni.compression.base.config import select_modules_by_config
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from de_plugin.adapter import ChannelOptions, channel_groups, create_pruner, options_from, prune

from .coarse import RandomCoarsePruner
from .entries import setting, validated_entries
from .pruner import _score_of, sync_into_wrappers

log = logging.getLogger("de_plugin_nni")
UNSUPPORTED = {
    "sparse_ratio": "de_channel searches each group's ratio under one budget: give macs=0.5 (or params=0.5) to "
                    "the pruner instead",
    "sparse_threshold": "give the budget as macs= / params=",
    "max_sparse_ratio": "use the max_group_ratio option",
    "min_sparse_ratio": "drop the key",
    "global_group_id": "the budget is already global (macs= / params=); drop the key",
    "dependency_group_id": "coupled channels are found by the core's fx pass; drop the key",
    "internal_metric_block": "drop the key",
    "granularity": "it removes whole output channels; drop the key",
    "align": "drop the key",
}


def parse_channel_config(model: nn.Module, config_list: List[Dict], include_linear: bool) -> List[str]:
    """The layers the config_list selects (Conv2d, and Linear with ``include_linear``)."""
    configs = validated_entries(model, config_list, "de_channel", "{'op_types': ['Conv2d']}", UNSUPPORTED)
    kinds = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    layers: List[str] = []
    for i, cfg in enumerate(configs):
        modules, _, _ = select_modules_by_config(model, cfg)
        names = [n for n, m in modules.items() if isinstance(m, kinds)]
        if not names and setting(cfg, "op_names") is None and not cfg.get("op_types"):
            continue  # a legacy {'exclude': True} entry
        if not names:
            raise ValueError(f"config_list entry {i} selects no {' / '.join(k.__name__ for k in kinds)} layer: {cfg}")
        layers += [n for n in names if n not in layers]
    if not layers:
        raise ValueError("config_list selects no Conv2d layer to prune")
    return layers


class DEChannelPruner(RandomCoarsePruner):
    """DE over per-group channel counts under a MACs / parameter budget, for NNI (name ``de_channel``)."""

    name = "de_channel"

    def __init__(self, model: nn.Module, config_list: List[Dict], evaluator: Evaluator | None = None,
                 existed_wrappers: Dict[str, ModuleWrapper] | None = None, *, seed: int = 0, progress: bool = True,
                 train_data: Optional[List[Any]] = None, options: Optional[ChannelOptions] = None, **kwargs: Any):
        self._common(evaluator, seed, progress, train_data)
        self.options = options_from(ChannelOptions, "de_channel", options, kwargs)
        self.layers = parse_channel_config(model, config_list, self.options.include_linear)
        dummy = evaluator.get_dummy_input()
        # depthwise and grouped convs over searched maps lose rows too, so they need wrappers
        passing = sorted({m for g in channel_groups(model, dummy) if set(g.producers) <= set(self.layers)
                          for m, _ in g.depthwise + g.grouped} - set(self.layers))
        cfg = [{"op_names": self.layers + passing, "sparse_ratio": 0.5}]
        super(RandomCoarsePruner, self).__init__(model, cfg, evaluator, existed_wrappers)
        self.result: Dict[str, Any] = {}

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        evaluator = self.evaluator
        if max_steps is not None or max_epochs is not None:
            raise ValueError("de_channel retrains for finetune_epochs per round (a constructor option); call "
                             "compress() without max_steps/max_epochs")
        self.unwrap_model()
        model = self.bound_model
        evaluator.bind_model(model)
        try:
            calib = self._calibration()
            r = prune(model, create_pruner("de_channel", self.options),
                      evaluate=lambda _m: _score_of(evaluator.evaluate()),
                      finetune=lambda _m, e: evaluator.train(max_epochs=e), train_data=calib, layers=self.layers,
                      inplace=True, seed=self.seed, progress=self.progress)
            self.result = {"reference": r.reference_accuracy, "accuracy": r.accuracy, "history": r.history,
                           "nfev": r.nfev, "param_masks": r.extra_masks, "adaptive_bn_batches": len(calib or []),
                           **{k: r.extra[k] for k in ("macs", "macs_dense", "macs_kept", "params", "params_dense",
                                                      "params_kept", "groups")}}
        finally:
            evaluator.unbind_model()
            sync_into_wrappers(self)
            self.wrap_model()
        self.update_masks(self._nni_masks(self.result["param_masks"]))
        log.info("de_channel (NNI): %d evaluations, val %.4f -> %.4f, MACs kept %.3f, parameters kept %.3f",
                 self.result["nfev"], self.result["reference"], self.result["accuracy"], self.result["macs_kept"],
                 self.result["params_kept"])

    def _nni_masks(self, masks: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        """Each wrapped layer's own removed output channels (rows), as NNI's ``ModelSpeedup`` wants them.

        Quirk (NNI 3.0): given masks that also zero the input columns of channels removed upstream,
        ModelSpeedup mis-sizes residual adds; it derives the inputs itself (see ``coarse.own_masks``)."""
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name in self._target_spaces:
            mod = self.bound_model.get_submodule(name)
            w = masks.get(f"{name}.weight")
            rows = torch.ones(mod.weight.shape[0], dtype=torch.bool) if w is None else w.flatten(1).any(1).cpu()
            out[name] = {"weight": rows.view(-1, *[1] * (mod.weight.dim() - 1)).expand_as(mod.weight).float().clone()}
            if "bias" in self._target_spaces[name] and mod.bias is not None:
                out[name]["bias"] = rows.float().clone()
        return out
