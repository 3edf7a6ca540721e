"""The pruner contract and ``prune()``, the one public entry point of the core.

A pruner gets a :class:`Context` (a working copy of the model, its prunable targets, the user's
``evaluate`` / ``finetune`` callables and the goal) and returns an :class:`~de_plugin.result.Outcome`;
:func:`prune` turns that into the user's :class:`PruningResult`, in one place.
Everything that can be wrong with the input is checked here, before any work and before the
user's model is copied, so a bad call never leaves a half-pruned model behind.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import numbers
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import torch
from torch import nn

from .evaluation import check_batches, check_score, evaluator_from_batches, low_memory_for
from .options import Options, options_from
from .registry import get_metric, get_pruner_class
from .result import Outcome, PruningResult
from .targets import Target, find_targets, layer_sparsity

log = logging.getLogger("de_plugin")

Evaluate = Callable[[nn.Module], float]
Finetune = Callable[[nn.Module, int], None]


@dataclass
class Context:
    """Everything a pruner needs; built and validated by :func:`prune`."""

    model: nn.Module
    targets: list[Target]
    evaluate: Optional[Evaluate]
    finetune: Optional[Finetune]
    sparsity: Optional[float]
    max_accuracy_drop: Optional[float]
    seed: int
    progress: bool = True
    #: training batches (``train_data``), e.g. for adaptive BatchNorm; validation batches (``val_data``)
    train_batches: Optional[list] = None
    val_batches: Optional[list] = None
    #: the metric of ``val_data`` (outputs, labels) -> float, for backends that batch candidates
    metric: Optional[Callable] = None

    def score(self, model: nn.Module | None = None) -> float:
        """Call the user's ``evaluate`` and insist on a finite number."""
        if self.evaluate is None:
            raise ValueError("this pruner needs `evaluate` (a callable model -> float)")
        value = self.evaluate(self.model if model is None else model)
        return check_score(value)


class Pruner:
    """Base class of every pruner. Subclasses set ``name``, ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    #: whether ``evaluate`` is needed when a ``sparsity`` budget is given.
    needs_evaluate: ClassVar[bool] = True
    #: "sparsity": exactly one of ``sparsity`` / ``max_accuracy_drop``; "ratios": the pruner's own
    #: options say how much to prune (random_coarse's per-layer channel / kernel ratios)
    goal: ClassVar[str] = "sparsity"
    #: with goal "ratios": the options that say how much to prune, for the error on a `sparsity` goal
    goal_options: ClassVar[str] = "its ratio options (e.g. feature_map_ratio=0.5, kernel_ratio=0.3)"

    def __init__(self, options: Optional[Options] = None, **kwargs: Any) -> None:
        """Options as keywords (validated here), or as an ``Options`` object validated already."""
        self.options = options_from(self.Options, self.name, options, kwargs)

    def check_targets(self, model: nn.Module, targets: Sequence[Target], train_batches: Optional[list],
                      val_batches: Optional[list] = None, metric: Optional[Callable] = None) -> None:
        """Raise ``ValueError`` for what is wrong with these options on this model, before any work
        (``prune`` calls it once the targets are known; the default has nothing to check)."""

    def check_call(self, finetune: Optional[Callable], sparsity: Optional[float]) -> None:
        """Raise ``ValueError`` for options that need a callable or goal the call lacks (``prune`` calls it
        before any work; pruners whose adapters build the context themselves call it again from ``run``)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """The pruner's own state at a round boundary (RNGs, warm-start data), plain data; a round loop's
        checkpoint holds it."""
        return {}

    def restore_checkpoint_state(self, data: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`, called after the pruner's ``begin`` when resuming."""

    def close(self) -> None:
        """Release what the run set up (evaluation workers); called however it ends."""

    def run(self, ctx: Context) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError


EXAMPLES = {"sparsity": "0.9 prunes 90% of the weights", "max_accuracy_drop": "0.005 allows a 0.5 pp drop"}


def _check_fraction(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"`{label}` must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{label}` must lie in [0, 1) (a fraction: {EXAMPLES[label]}), got {value}")
    return float(value)


class Undo:
    """The user's weights as they were, put back if pruning in place fails. In host memory (a model on a GPU
    keeps its accelerator memory for the pruning), or with ``spill`` in a temporary file: a second copy of a
    large model is what low memory avoids."""

    def __init__(self, model: nn.Module, spill: bool):
        self.path: Optional[str] = None
        self.state: Optional[dict] = None
        if spill:
            fd, self.path = tempfile.mkstemp(prefix="de_plugin_undo_", suffix=".pt")
            os.close(fd)
            try:
                torch.save(model.state_dict(), self.path)
            except (OSError, RuntimeError) as exc:  # a full disk: keep the copy in memory instead
                log.warning("cannot write the undo copy to %s (%s); keeping it in memory", self.path, exc)
                self.close()
        if self.path is None:
            self.state = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                          for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module) -> None:
        state = self.state if self.path is None else torch.load(self.path, mmap=True, weights_only=False)
        model.load_state_dict(state)

    def close(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None


def prune(
    model: nn.Module,
    name: "str | Pruner",
    *,
    evaluate: Optional[Evaluate] = None,
    finetune: Optional[Finetune] = None,
    sparsity: Optional[float] = None,
    max_accuracy_drop: Optional[float] = None,
    seed: int = 0,
    val_data: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]] = None,
    train_data: Optional[Iterable[Any]] = None,
    metric: str | Callable = "accuracy",
    layers: Optional[Sequence[str]] = None,
    layer_types: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    inplace: bool = False,
    progress: bool = True,
    **options: Any,
) -> PruningResult:
    """Prune ``model`` with the pruner registered as ``name``.

    Give exactly one goal: ``sparsity`` (fraction of zeros over the pruned layers' weights) or
    ``max_accuracy_drop`` (in the units of ``evaluate``, e.g. 0.005 = 0.5 pp). ``evaluate(model)``
    returns validation accuracy (higher is better); ``finetune(model, epochs)`` trains in place
    with any loop (masks stay applied). Instead of ``evaluate`` you may pass ``val_data`` batches
    and a ``metric`` name; ``train_data`` batches serve pruners that need training inputs (adaptive
    BatchNorm). Pruners with ``goal = "ratios"`` (``random_coarse``) take no ``sparsity`` /
    ``max_accuracy_drop``: their options say how much to prune. ``layers`` / ``layer_types`` / ``exclude`` select the pruned weights.
    Remaining keyword ``options`` go to the pruner and are validated. ``name`` may instead be a pruner
    created already (``create_pruner``), whose options were validated then. The input model is copied
    unless ``inplace=True``.
    """
    pruner, name = _pruner_for(name, options)
    ctx = _checked_context(pruner, name, model, evaluate, finetune, sparsity, max_accuracy_drop, seed, val_data,
                           train_data, metric, layers, layer_types, exclude, progress)
    work = ctx.model = model if inplace else copy.deepcopy(model)
    spill = low_memory_for(getattr(getattr(pruner, "options", None), "low_memory", False), ctx.targets)
    snapshot = Undo(model, spill) if inplace else None
    t0 = time.perf_counter()
    try:
        outcome = pruner.run(ctx)
    except BaseException:
        if snapshot is not None:  # never leave the user's model half-pruned
            snapshot.restore(model)
        raise
    finally:
        if snapshot is not None:
            snapshot.close()
    return build_result(name, pruner, outcome, work, ctx.seed, time.perf_counter() - t0)


def _pruner_for(name: "str | Pruner", options: dict[str, Any]) -> tuple[Pruner, str]:
    if isinstance(name, Pruner):
        if options:
            raise TypeError(f"prune() got options {sorted(options)} for a pruner object: set them when creating "
                            f"it (create_pruner({name.name!r}, ...)), or pass the pruner's name instead")
        return name, name.name
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a registered pruner's name or a Pruner, got {type(name).__name__}")
    return get_pruner_class(name)(**options), name


def _checked_context(pruner: Pruner, name: str, model: Any, evaluate: Any, finetune: Any, sparsity: Any,
                     max_accuracy_drop: Any, seed: Any, val_data: Any, train_data: Any, metric: str | Callable,
                     layers: Any, layer_types: Any, exclude: Any, progress: bool) -> Context:
    """Everything about a :func:`prune` call checked, before any work; the context on the user's own model
    (``prune`` swaps in the working copy)."""
    cls = type(pruner)
    sparsity, max_accuracy_drop = _check_goal(cls, name, sparsity, max_accuracy_drop)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if evaluate is not None and val_data is not None:
        raise ValueError("give either `evaluate` or `val_data`, not both")
    val_batches = train_batches = None
    if val_data is not None:
        val_batches = check_batches(val_data, "val_data", pairs=True)
        evaluate = evaluator_from_batches(val_batches, metric)
    if train_data is not None:
        train_batches = check_batches(train_data, "train_data", pairs=False)
    _check_callables(cls, name, evaluate, finetune, max_accuracy_drop)
    if not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an integer, got {seed!r}")
    targets = find_targets(model, layers, layer_types, exclude)
    metric_fn = None if val_batches is None else (get_metric(metric) if isinstance(metric, str) else metric)
    pruner.check_targets(model, targets, train_batches, val_batches, metric_fn)
    pruner.check_call(finetune, sparsity)
    return Context(model=model, targets=targets, evaluate=evaluate, finetune=finetune, sparsity=sparsity,
                   max_accuracy_drop=max_accuracy_drop, seed=int(seed), progress=progress, train_batches=train_batches,
                   val_batches=val_batches, metric=metric_fn)


def check_goal(name: str, sparsity: Any = None, max_accuracy_drop: Any = None) -> None:
    """The goal checks of :func:`prune` for pruner ``name``, for callers that validate before work
    (the CLI, before it loads data and trains)."""
    _check_goal(get_pruner_class(name), name, sparsity, max_accuracy_drop)


def _check_goal(cls: type[Pruner], name: str, sparsity: Any, max_accuracy_drop: Any,
                ) -> tuple[Optional[float], Optional[float]]:
    """Exactly one goal for sparsity-driven pruners, none for ratio-driven ones; fractions in [0, 1)."""
    if cls.goal == "ratios":
        if sparsity is not None or max_accuracy_drop is not None:
            raise ValueError(f"pruner {name!r} is driven by {cls.goal_options}, not by `sparsity` / "
                             "`max_accuracy_drop`")
    elif (sparsity is None) == (max_accuracy_drop is None):
        raise ValueError(
            "give exactly one of `sparsity` (a budget, e.g. sparsity=0.9) or `max_accuracy_drop` "
            "(an accuracy constraint, e.g. max_accuracy_drop=0.005)"
        )
    return (None if sparsity is None else _check_fraction("sparsity", sparsity),
            None if max_accuracy_drop is None else _check_fraction("max_accuracy_drop", max_accuracy_drop))


def _check_callables(cls: type[Pruner], name: str, evaluate: Any, finetune: Any, max_accuracy_drop: Any) -> None:
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"`evaluate` must be callable as evaluate(model) -> float, got {type(evaluate).__name__}")
    if finetune is not None and not callable(finetune):
        raise TypeError(f"`finetune` must be callable as finetune(model, epochs), got {type(finetune).__name__}")
    for label, fn, args in (("evaluate", evaluate, ("model",)), ("finetune", finetune, ("model", "epochs"))):
        if fn is not None and not _accepts(fn, len(args)):
            raise TypeError(f"`{label}` must accept {len(args)} positional argument(s): {label}({', '.join(args)}); "
                            f"its signature is {label}{inspect.signature(fn)}")
    if evaluate is None and (cls.needs_evaluate or max_accuracy_drop is not None):
        need = "max_accuracy_drop" if max_accuracy_drop is not None else f"pruner {name!r}"
        raise ValueError(f"{need} needs `evaluate` (a callable model -> float) or `val_data` batches")


def _accepts(fn: Callable, n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when it cannot be inspected)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*range(n))
    except TypeError:
        return False
    return True


def build_result(name: str, pruner: Pruner, outcome: Outcome, model: nn.Module, seed: int,
                 wall_time: float) -> PruningResult:
    """The user's result from a pruner's outcome: sparsity and per-layer figures over the outcome's
    targets (docs/ALGORITHMS.md section 0: weights of the pruned layers only)."""
    masks = outcome.masks
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    per_layer = layer_sparsity(masks)
    layers = [{"name": t.name, "type": t.module_type, "shape": list(t.shape), "params": t.numel,
               "kept": int(masks[t.name].sum()), "sparsity": per_layer[t.name]} for t in outcome.targets]
    return PruningResult(
        pruner=name, masks=masks, sparsity=1.0 - kept / total, layer_sparsity=per_layer,
        accuracy=outcome.accuracy, reference_accuracy=outcome.reference_accuracy, history=outcome.history,
        nfev=outcome.nfev, wall_time=wall_time, model=model, layers=layers, options=pruner.options.model_dump(),
        seed=seed, extra=outcome.extra, extra_masks=outcome.extra_masks, targets=list(outcome.targets),
    )
