"""``RandomCoarsePruner``: the core's ``random_coarse`` as an NNI 3.0 ``Pruner``.

``RandomCoarsePruner(model, config_list, evaluator, candidates=100, kernel_ratio=0.0, ...)``. Each
config_list entry selects Conv2d layers as NNI does; its ``sparse_ratio`` is the fraction of each
layer's output channels (feature maps) removed, as for NNI's ``L1NormPruner``. Coupled channels
follow NNI's dependency groups: the entries' ``dependency_group_id`` when given, otherwise NNI's
own ``auto_set_denpendency_group_ids`` on the traced model; BatchNorm layers and consumers come
from the core's fx pass. ``compress()`` scores N random masks with ``evaluator.evaluate()``
(adaptive BN on the evaluator's training data for BN models), keeps the best, retrains once with
``evaluator.train(max_epochs=finetune_epochs)`` and puts the masks into NNI's wrappers, so
``ModelSpeedup`` turns them into a smaller dense model. Kernel masks (``kernel_ratio``) stay masks.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from nni.compression.base.compressor import Pruner
from nni.compression.base.config import select_modules_by_config
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from de_plugin.adapter import (
    BNState,
    CoarseOptions,
    CoarseSpace,
    Context,
    Target,
    channel_groups,
    create_pruner,
    options_from,
)

from .evaluators import patch_lightning_evaluator
from .entries import setting, validated_entries
from .pruner import _score_of, sync_into_wrappers

log = logging.getLogger("de_plugin_nni")
CONFIG_OWNED = {"feature_map_ratio", "ratios"}
#: NNI settings random_coarse cannot honour (dependency_group_id is honoured: coupled channels)
UNSUPPORTED = {
    "granularity": "it removes whole output channels (granularity 'out_channel'); use l1norm for other granularities",
    "internal_metric_block": "it scores whole-network candidates, not per-block metrics; drop the key",
    "global_group_id": "ratios are per layer (sparse_ratio of each layer's channels); drop the key",
    "sparse_threshold": "give the fraction of channels as sparse_ratio",
    "align": "drop the key",
}


def parse_coarse_config(model: nn.Module, config_list: List[Dict]) -> tuple[Dict[str, float], List[List[str]]]:
    """Per-layer feature-map ratios and NNI dependency groups from a config_list (NNI's schema)."""
    configs = validated_entries(model, config_list, "random_coarse", "{'op_types': ['Conv2d'], 'sparse_ratio': 0.5}",
                                UNSUPPORTED)
    ratios: Dict[str, float] = {}
    groups: Dict[Any, List[str]] = {}
    for i, cfg in enumerate(configs):
        modules, _, _ = select_modules_by_config(model, cfg)
        names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        ratio = setting(cfg, "sparse_ratio")
        if ratio is None and not names:
            continue  # a legacy {'exclude': True} entry: NNI turned it into exclusions of every entry
        if ratio is None or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"config_list entry {i}: sparse_ratio (fraction of each layer's output channels) must "
                             f"lie in [0, 1), got {ratio}")
        if not names:
            raise ValueError(f"config_list entry {i} selects no Conv2d layer: {cfg}")
        for n in names:
            ratios[n] = float(ratio)
        if setting(cfg, "dependency_group_id") is not None:
            groups.setdefault(setting(cfg, "dependency_group_id"), []).extend(names)
    if not ratios:
        raise ValueError("config_list selects no Conv2d layer to prune")
    return ratios, list(groups.values())


def nni_dependency_groups(model: nn.Module, dummy_input: Any, layers: List[str]) -> List[List[str]]:
    """NNI's own channel dependency analysis (``auto_set_denpendency_group_ids``) over ``layers``."""
    from nni.compression.speedup import auto_set_denpendency_group_ids
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*(dummy_input if isinstance(dummy_input, tuple) else (dummy_input,)))
    cfg = auto_set_denpendency_group_ids(gm, [{"op_names": list(layers), "sparse_ratio": 0.5}])
    groups: Dict[Any, List[str]] = {}
    for entry in cfg:
        if entry.get("dependency_group_id") is not None:
            groups.setdefault(entry["dependency_group_id"], []).extend(entry["op_names"])
    return [g for g in groups.values() if len(g) > 1]


def own_masks(space: CoarseSpace, cand: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Per conv weight: its own removed feature maps (rows) and removed kernels, without the
    zeroed input columns of maps removed upstream.

    Quirk (NNI 3.0): ModelSpeedup's mask propagation derives a conv's removed inputs itself; given
    weight masks that also zero the input columns of maps removed upstream, it mis-sizes residual
    adds (one branch shrinks, the other does not). So NNI gets each conv's own decisions only.
    Quirk (NNI 3.0): it does not carry a removed map through a depthwise conv (MobileNetV2's
    expand -> depthwise -> project keeps every depthwise channel); a depthwise conv gets the rows
    of the maps it passes through.
    """
    out: Dict[str, torch.Tensor] = {}
    for g, k in zip(space.groups, cand["channels"]):
        for p in g.producers:  # Conv2d or Linear: rows are output channels / features
            w = space.param(p + ".weight")
            out[p + ".weight"] = torch.from_numpy(k).to(w.device).view(-1, *[1] * (w.dim() - 1)).expand_as(w).clone()
        for m, off in g.depthwise + g.grouped:
            w = space.param(m + ".weight")
            rows = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            rows[off:off + len(k)] = torch.from_numpy(k).to(w.device)
            out[m + ".weight"] = rows[:, None, None, None].expand_as(w).clone()
    in_alive = space.alive(cand["channels"])[0]
    for layer, k in zip(space.kernel_layers, cand["kernels"]):
        w = space.param(layer + ".weight")
        m = out.get(layer + ".weight", torch.ones(w.shape, dtype=torch.bool, device=w.device))
        # kernels of input maps removed upstream are not this layer's own decision
        alive = in_alive.get(layer, np.ones(w.shape[1], bool))
        kk = torch.from_numpy(k | ~alive[None, :]).to(w.device)
        out[layer + ".weight"] = m & kk[:, :, None, None]
    return out


def training_inputs(evaluator: Evaluator, model: nn.Module, steps: int) -> Optional[list]:
    """The inputs the evaluator's own training function feeds ``model`` in ``steps`` steps, with the
    optimizer step disabled and the model's BatchNorm statistics and the LR schedulers put back: the
    batches adaptive BN re-estimates statistics on when the user passes no ``train_data``.

    Quirk (NNI 3.0): ``Evaluator.patch_optimizer_step`` always calls the original ``step`` (NNI's
    data-driven pruners only add tasks around it), so the step of ``TorchEvaluator``'s first optimizer is
    replaced here for the duration and restored; other evaluators give None (then ``train_data=``).
    """
    optimizers = getattr(evaluator, "_optimizers", None)
    if not optimizers:
        return None
    seen: list = []

    def grab(_mod, args):
        if args and isinstance(args[0], torch.Tensor) and len(seen) < steps:
            seen.append(args[0].detach().clone())

    schedulers = [(s, s.state_dict()) for s in getattr(evaluator, "_lr_schedulers", None) or []]
    stats = BNState(model)
    was_training = model.training
    handle = model.register_forward_pre_hook(grab)
    original = optimizers[0].step
    optimizers[0].step = lambda *a, **k: None  # noqa: E731 - no weight moves while the inputs are captured
    try:
        evaluator.train(max_steps=steps)
    finally:
        optimizers[0].step = original
        handle.remove()
        stats.restore()
        for sched, state in schedulers:
            sched.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    log.info("NNI: adaptive BN on %d batches from the evaluator's training function", len(seen))
    return seen or None


class RandomCoarsePruner(Pruner):
    """Best-of-N random feature-map / kernel masks for NNI (name ``random_coarse``)."""

    name = "random_coarse"

    def __init__(self, model: nn.Module, config_list: List[Dict], evaluator: Evaluator | None = None,
                 existed_wrappers: Dict[str, ModuleWrapper] | None = None, *, seed: int = 0, progress: bool = True,
                 train_data: Optional[List[Any]] = None, options: Optional[CoarseOptions] = None, **kwargs: Any):
        self._common(evaluator, seed, progress, train_data)
        bad = CONFIG_OWNED & (set(kwargs) | (options.model_fields_set if options is not None else set()))
        if bad:
            raise ValueError(f"{sorted(bad)}: in NNI the feature-map ratio of each layer is the config_list's "
                             f"sparse_ratio")
        self.options = options_from(CoarseOptions, "random_coarse", options, kwargs).model_copy()  # set below
        self.ratios, self.given_groups = parse_coarse_config(model, config_list)
        self.options.ratios = dict(self.ratios)
        self.options.feature_map_ratio = 0.0
        dummy = evaluator.get_dummy_input()
        self.couple = self.given_groups or nni_dependency_groups(model, dummy, sorted(self.ratios))
        # depthwise and grouped convs over pruned maps get the producer's rows too, so they need wrappers
        depthwise = sorted({m for g in channel_groups(model, dummy, self.couple) if set(g.producers) & set(self.ratios)
                            for m, _ in g.depthwise + g.grouped} - set(self.ratios))
        conv_cfg = [{"op_names": sorted(self.ratios) + depthwise, "sparse_ratio": 0.5}]
        super().__init__(model, conv_cfg, evaluator, existed_wrappers)
        self.result: Dict[str, Any] = {}

    def _common(self, evaluator: Any, seed: int, progress: bool, train_data: Optional[List[Any]]) -> None:
        """What every evaluator-scored pruner here checks and keeps first (``de_channel`` shares it)."""
        if evaluator is None or not isinstance(evaluator, Evaluator):
            raise TypeError(f"{self.name} needs an NNI Evaluator (TorchEvaluator or LightningEvaluator): its "
                            f"evaluate() scores the candidates, got {type(evaluator).__name__}")
        patch_lightning_evaluator()
        self.seed, self.progress = int(seed), bool(progress)
        self.train_data = list(train_data) if train_data is not None else None

    def _calibration(self) -> Optional[list]:
        """Adaptive-BN batches: ``train_data=`` if given, else the evaluator's own training inputs."""
        if self.train_data is not None:
            return self.train_data
        try:  # LightningEvaluator: its datamodule's training batches
            loader = self.evaluator.data_module.train_dataloader()  # type: ignore[attr-defined]
            return [b for _, b in zip(range(self.options.bn_batches), loader)]
        except AttributeError:
            pass
        if self.options.adaptive_bn is False or not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                         for m in self.bound_model.modules()):
            return None
        return training_inputs(self.evaluator, self.bound_model, self.options.bn_batches)

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        evaluator = self.evaluator
        if max_steps is not None or max_epochs is not None:
            raise ValueError("random_coarse retrains once for finetune_epochs (a constructor option); call compress() "
                             "without max_steps/max_epochs")
        self.unwrap_model()
        model = self.bound_model
        evaluator.bind_model(model)
        try:  # the core's random_coarse, stepped through its round loop on the unwrapped model
            opts = self.options.model_copy()
            opts.couple = self.couple
            core = create_pruner("random_coarse", opts)
            modules = dict(model.named_modules())
            targets = [Target(n, "weight", type(modules[n]).__name__, tuple(modules[n].weight.shape))
                       for n in sorted(self.ratios)]
            ctx = Context(model=model, targets=targets, evaluate=lambda _m: _score_of(evaluator.evaluate()),
                          finetune=lambda _m, e: evaluator.train(max_epochs=e), sparsity=None, max_accuracy_drop=None,
                          seed=self.seed, progress=self.progress, train_batches=self._calibration())
            out = core.runner().run(ctx)
            core.close()
            found, masks, ex = core.found, out.extra_masks, out.extra
            own = own_masks(core.space, found.best)
            self.result = {"reference": out.reference_accuracy, "best_candidate_score": found.score,
                           "candidate_scores": found.scores, "before_retraining": ex["accuracy_before_retraining"],
                           "accuracy": out.accuracy, "groups": found.groups, "macs": ex["macs"],
                           "macs_dense": ex["macs_dense"], "macs_kept": ex["macs_kept"], "params": ex["params"],
                           "params_dense": ex["params_dense"], "param_masks": masks,
                           "adaptive_bn_batches": len(found.calib or [])}
        finally:
            evaluator.unbind_model()
            sync_into_wrappers(self)
            self.wrap_model()
        nni_masks: Dict[str, Dict[str, torch.Tensor]] = {}
        for name in self._target_spaces:
            mod = self.bound_model.get_submodule(name)
            w = own.get(f"{name}.weight")
            nni_masks[name] = {"weight": (w if w is not None else torch.ones_like(mod.weight, dtype=torch.bool)).float()}
            if "bias" in self._target_spaces[name] and mod.bias is not None:
                b = masks.get(f"{name}.bias")
                nni_masks[name]["bias"] = (b if b is not None else torch.ones_like(mod.bias, dtype=torch.bool)).float()
        self.update_masks(nni_masks)
        log.info("random_coarse (NNI): best of %d val %.4f, after retraining %.4f, MACs %.1f%% kept",
                 len(self.result["candidate_scores"]), self.result["best_candidate_score"], self.result["accuracy"],
                 100 * self.result["macs_kept"])

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):
        """``compress()`` with no arguments (NNI 3.0's ``Pruner.compress`` requires both)."""
        return super().compress(max_steps, max_epochs)

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        raise ValueError(f"{self.name} picks its masks before retraining; it is not fused or scheduled "
                         "(prune, speed up, then quantize)")

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:  # pragma: no cover - never fused
        pass
