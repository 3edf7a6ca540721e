"""``DELayerwisePruner``: the core's ``de_layerwise`` as an NNI 3.0 ``Pruner``, and every other
core pruner that allocates per-layer weight counts (the baselines ``lamp``, ``erk``,
``global_magnitude``, ``uniform_magnitude`` and third parties' :class:`IterativePruner` plugins)
through :func:`weight_pruner`, a subclass per name.

NNI's own arguments: ``(model, config_list, evaluator, existed_wrappers=None, **de_options)``.
Each config_list entry selects layers as NNI does (``op_types``, ``op_names``,
``exclude_op_names``...); its ``sparse_ratio`` is the *overall* budget of that entry's layers
(as NNI reads it for a ``global_group_id`` group), which DE allocates across them;
``max_sparse_ratio`` / ``min_sparse_ratio`` bound every layer. Only weights are pruned.

Two ways it runs, like NNI's built-ins:

* ``compress()`` alone: the full de_layerwise loop (search -> prune -> fine-tune with recovery,
  ``rounds`` times) using the evaluator's ``evaluate()`` as fitness and ``train()`` for
  fine-tuning; masks end in NNI's wrappers, ``compress()`` returns ``(model, masks)``.
* fused (``AGPPruner`` / ``LinearPruner`` scheduling, ``QATQuantizer.from_compressor``): at each
  scheduled mask update DE re-allocates the current sparse ratio over the layers (warm-started from
  the previous allocation); the schedule's own training fine-tunes.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, List, Literal, Optional

import torch
from nni.compression.base.compressor import Pruner
from nni.compression.base.config import select_modules_by_config
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from de_plugin.adapter import (
    Context,
    RoundRunner,
    Target,
    Options,
    check_batches,
    check_score,
    get_pruner_class,
    masks_attached,
    options_from,
    prune,
)

from .entries import setting, validated_entries
from .evaluators import patch_lightning_evaluator

log = logging.getLogger("de_plugin_nni")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: NNI settings de_layerwise cannot honour: refused with the reason rather than silently ignored
UNSUPPORTED = {
    "granularity": "it prunes single weights (granularity 'default'); use l1norm / random_coarse for channels",
    "dependency_group_id": "it prunes single weights, which need no channel alignment; drop the key",
    "internal_metric_block": "it ranks single weights by magnitude; drop the key",
    "global_group_id": "each entry already is one global budget over its layers; put the layers in one entry",
    "sparse_threshold": "give the budget as sparse_ratio",
    "align": "drop the key",
}


def _score_of(metric: Any) -> float:
    """NNI evaluators return a float, or (float, extra); take the number."""
    if isinstance(metric, (tuple, list)) and metric:
        metric = metric[0]
    if metric is None:
        raise ValueError("the NNI evaluator returned None: give it an evaluating_func that returns accuracy")
    return check_score(metric)


def parse_config_list(model: nn.Module, config_list: List[Dict], pruner: str = "de_layerwise") -> List[Dict[str, Any]]:
    """Validate ``config_list`` with NNI's own schema and return one group per entry.

    Raises ValueError in plain words before NNI wraps anything.
    """
    configs = validated_entries(model, config_list, pruner, "{'op_types': ['Linear'], 'sparse_ratio': 0.9}",
                                UNSUPPORTED)
    groups, owner = [], {}
    for i, cfg in enumerate(configs):
        ratio = setting(cfg, "sparse_ratio")
        modules, _, _ = select_modules_by_config(model, cfg)
        names = [n for n, m in modules.items() if isinstance(m, PRUNABLE)]
        if ratio is None and not names:
            continue  # a legacy {'exclude': True} entry: NNI turned it into exclusions of every entry
        if ratio is None:
            raise ValueError(f"config_list entry {i} needs 'sparse_ratio' (the overall budget of its layers; "
                             "NNI's legacy 'sparsity' / 'total_sparsity' work too)")
        if not names:
            raise ValueError(f"config_list entry {i} selects no Conv/Linear layer of the model: {cfg}")
        for n in names:
            owner[n] = len(groups)
        groups.append({"index": i, "layers": names, "sparse_ratio": float(ratio),
                       "max_sparse_ratio": float(setting(cfg, "max_sparse_ratio") or 0.995),
                       "min_sparse_ratio": float(setting(cfg, "min_sparse_ratio") or 0.0)})
    for g_i, g in enumerate(groups):  # a layer selected twice belongs to the last entry, as in NNI
        g["layers"] = [n for n in g["layers"] if owner[n] == g_i]
    groups = [g for g in groups if g["layers"]]
    if not groups:
        raise ValueError("config_list selects no prunable layer")
    return groups


def sync_into_wrappers(pruner: Pruner) -> None:
    """Quirk (nni 3.0): ``wrap()`` restores each wrapper's own copy of the parameters taken at
    construction, discarding training done on the unwrapped model; copy the trained values in."""
    with torch.no_grad():
        for wrapper in pruner._module_wrappers.values():
            for name, param in wrapper.module.named_parameters(recurse=False):
                own = wrapper._parameters.get(name)
                if own is not None and own.shape == param.shape:
                    own.copy_(param)


class DELayerwisePruner(Pruner):
    """Differential-evolution layer-wise magnitude pruning for NNI (name ``de_layerwise``); with another
    ``core_name`` (see :func:`weight_pruner`), any core pruner that allocates per-layer keep-counts."""

    #: the core pruner this NNI pruner runs (an :class:`IterativePruner` by its registered name)
    core_name: ClassVar[str] = "de_layerwise"

    def __init__(self, model: nn.Module, config_list: List[Dict], evaluator: Evaluator | None = None,
                 existed_wrappers: Dict[str, ModuleWrapper] | None = None, *, seed: int = 0,
                 progress: bool = True, train_data: Any = None, options: Optional[Options] = None, **de_options: Any):
        if evaluator is not None and not isinstance(evaluator, Evaluator):
            raise TypeError(f"evaluator must be an NNI Evaluator (TorchEvaluator or LightningEvaluator), "
                            f"got {type(evaluator).__name__}")
        patch_lightning_evaluator()
        self.options = options_from(get_pruner_class(self.core_name).Options, self.core_name, options, de_options)
        self.groups = parse_config_list(model, config_list, self.core_name)
        self.seed, self.progress = int(seed), bool(progress)
        # a few training batches: BatchNorm models score candidates after re-estimating BN (adaptive BN)
        self.train_data = None if train_data is None else check_batches(train_data, "train_data", pairs=False)
        super().__init__(model, config_list, evaluator, existed_wrappers)
        # what LinearPruner / AGPPruner drive (see _NormPruner)
        self.interval_steps = -1
        self.total_times: int | Literal["unlimited"] = 1
        self.first_step_gen = False
        self.results: list = []
        self._runners: dict[int, RoundRunner] = {}

    # ------------------------------------------------------------------ helpers
    def _require_evaluator(self) -> Evaluator:
        if self.evaluator is None:
            raise ValueError(f"{self.core_name} needs an NNI evaluator (its evaluate() scores the rounds, its "
                             "train() fine-tunes)")
        return self.evaluator

    def _evaluate(self, _model: nn.Module | None = None) -> float:
        """The evaluator's score; every module's train/eval mode is put back afterwards, since NNI's
        schedules call this inside their training loop and a user's evaluating_func may leave the
        model in eval mode (seen with LinearPruner + TorchEvaluator: most steps then trained in eval mode)."""
        modes = [(m, m.training) for m in self.bound_model.modules()]
        try:
            return _score_of(self._require_evaluator().evaluate())
        finally:
            for m, mode in modes:
                m.training = mode

    def _group_pruner(self, g: Dict[str, Any]) -> Any:
        """The core pruner for one config entry: the options validated at construction, with the entry's
        per-layer bounds assigned (each assignment is validated; nothing is re-validated from a dump)."""
        opts = self.options.model_copy()
        opts.max_layer_sparsity = g["max_sparse_ratio"]
        opts.min_layer_sparsity = g["min_sparse_ratio"]
        return get_pruner_class(self.core_name)(opts)

    def _masks_to_nni(self, masks: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, m in masks.items():
            module_name = name.rsplit(".", 1)[0]
            out[module_name] = {"weight": m.float()}
        return out

    # ------------------------------------------------------------------ single compress
    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        """The core pruner's whole loop on the unwrapped model, then masks into NNI's wrappers."""
        evaluator = self._require_evaluator()
        if max_steps is not None or max_epochs is not None:
            raise ValueError(f"{self.core_name} fine-tunes per round (option finetune_epochs); call compress() "
                             "without max_steps/max_epochs, or schedule it with AGPPruner/LinearPruner")
        self.unwrap_model()
        evaluator.bind_model(self.bound_model)
        held: list = []  # the entries pruned so far: their masks hold while later entries fine-tune
        masks: Dict[str, torch.Tensor] = {}

        def finetune(model: nn.Module, epochs: int) -> None:
            with masks_attached(model, held, masks):
                evaluator.train(max_epochs=epochs)

        try:
            for g in self.groups:
                res = prune(
                    self.bound_model, self._group_pruner(g), evaluate=self._evaluate, finetune=finetune,
                    sparsity=g["sparse_ratio"], layers=g["layers"], layer_types=["Linear", "Conv1d", "Conv2d", "Conv3d"],
                    inplace=True, seed=self.seed, progress=self.progress, train_data=self.train_data,
                )
                self.results.append(res)
                masks.update(res.masks)
                held += res.targets
        finally:
            evaluator.unbind_model()
            sync_into_wrappers(self)
            self.wrap_model()
        self.update_masks(self._masks_to_nni(masks))

    # ------------------------------------------------------------------ fused / scheduled
    def generate_masks(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """One step of each group's round runner at the target spaces' current sparse ratio: DE
        re-allocates it over the layers (warm-started from the previous step); the schedule's own
        training fine-tunes between steps."""
        masks: Dict[str, Dict[str, torch.Tensor]] = {}
        for g_i, g in enumerate(self.groups):
            spaces = [self._target_spaces[n]["weight"] for n in g["layers"]]
            ratio = spaces[0].sparse_ratio if spaces[0].sparse_ratio is not None else g["sparse_ratio"]
            with torch.no_grad():  # pruning is monotone: masked weights stay pruned
                for s in spaces:
                    if s.mask is not None:
                        s.target.mul_(s.mask)
            runner = self._runners.get(g_i) or self._start_runner(g_i, g, spaces)
            with torch.no_grad():  # masks off while the search sets weights itself
                saved = [s.mask.clone() if s.mask is not None else None for s in spaces]
                for s in spaces:
                    s.mask = torch.ones_like(s.target)
            try:
                runner.step(target_sparsity=ratio)
            finally:
                for s, m in zip(spaces, saved):
                    s.mask = m
            for n, t in zip(g["layers"], runner.ctx.targets):
                masks[n] = {"weight": runner.masks[t.name].float()}
        return masks

    def _start_runner(self, g_i: int, g: Dict[str, Any], spaces: list) -> RoundRunner:
        """A scheduled run (no goal of its own) over the wrappers' weights, scored by the evaluator."""
        # the wrapped module's own weight is the target space's tensor: address it through the wrapper
        targets = [Target(f"{n}._nni_wrapper", "weight", "wrapped", tuple(s.target.shape))
                   for n, s in zip(g["layers"], spaces)]
        ctx = Context(model=self.bound_model, targets=targets, evaluate=self._evaluate, finetune=None, sparsity=None,
                      max_accuracy_drop=None, seed=self.seed, progress=False, train_batches=self.train_data)
        runner = RoundRunner(self._group_pruner(g))
        runner.start(ctx)
        self._runners[g_i] = runner
        return runner

    def _register_trigger(self, evaluator: Evaluator) -> None:
        """Same contract as NNI's ``_NormPruner``: regenerate masks every ``interval_steps``."""
        self._current_step = 0
        self._is_first_step = True
        self._remaining_times = self.total_times

        def optimizer_task() -> None:
            self._current_step += 1
            if (self._is_first_step and self.first_step_gen) or self._current_step == self.interval_steps:
                self.update_masks(self.generate_masks())
                if isinstance(self._remaining_times, int):
                    self._remaining_times -= 1
            if self._current_step == self.interval_steps and (
                self._remaining_times == "unlimited" or self._remaining_times > 0
            ):
                self._current_step = 0
            self._is_first_step = False

        evaluator.patch_optimizer_step(before_step_tasks=[], after_step_tasks=[optimizer_task])

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        if self.interval_steps == -1:  # fused without a scheduler (e.g. QAT): search once, up front
            self.update_masks(self.generate_masks())
        else:
            self._register_trigger(evaluator)

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):
        """``compress()`` with no arguments (NNI 3.0's ``Pruner.compress`` requires both)."""
        return super().compress(max_steps, max_epochs)

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:
        for runner in self._runners.values():
            runner.pruner.close()


_WEIGHT_PRUNERS: Dict[str, type] = {"de_layerwise": DELayerwisePruner}


def weight_pruner(name: str) -> type:
    """The NNI pruner class that runs core pruner ``name`` (an :class:`IterativePruner`: per-layer
    keep-counts, magnitude inside each layer), made once per name."""
    if name not in _WEIGHT_PRUNERS:
        cls = type(f"NNIPruner_{name}", (DELayerwisePruner,), {
            "core_name": name, "__module__": __name__,
            "__doc__": f"The core pruner {name!r} for NNI: same config_list, compress() and schedules as de_layerwise."})
        _WEIGHT_PRUNERS[name] = cls
    return _WEIGHT_PRUNERS[name]


def export_config_list(masks: Dict[str, Dict[str, torch.Tensor]]) -> List[Dict[str, Any]]:
    """The searched allocation as a plain NNI config_list (one entry per layer), reusable with
    NNI's own pruners, e.g. ``LevelPruner(model, export_config_list(masks))``."""
    out = []
    for module_name, targets in masks.items():
        m = targets.get("weight")
        if m is None:
            continue
        # NNI 3.0's LevelPruner prunes int(numel * sparse_ratio) weights (sparse_gen._ratio_mask): a ratio
        # rounded below the exact one (float32 mean: 138/320 -> 0.43124998) pruned one weight fewer. The
        # ratio is written a hair above pruned / numel, so NNI's floor lands on exactly the same count.
        pruned = int(m.numel() - int(m.bool().sum()))
        out.append({"op_names": [module_name], "target_names": ["weight"],
                    "sparse_ratio": min(1.0, (pruned + 1e-6) / m.numel()) if pruned else 0.0})
    return out
