"""The pruner contract and ``prune()``, the one public entry point of the core.

A pruner gets a :class:`Context` (a working copy of the model, its prunable targets, the user's
``evaluate`` / ``finetune`` callables and the goal) and returns a :class:`PruningResult`.
Everything that can be wrong with the input is checked here, before any work and before the
user's model is copied, so a bad call never leaves a half-pruned model behind.
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import torch
from torch import nn

from .options import Options, validate_options
from .registry import get_metric, get_pruner_class
from .result import PruningResult
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


def check_score(value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`evaluate` must return a number (accuracy, higher is better), got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`evaluate` returned {value}; it must return a finite number (check the model and data)")
    return value


class Pruner:
    """Base class of every pruner. Subclasses set ``name``, ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    #: whether ``evaluate`` is needed when a ``sparsity`` budget is given.
    needs_evaluate: ClassVar[bool] = True
    #: "sparsity": exactly one of ``sparsity`` / ``max_accuracy_drop``; "ratios": the pruner's own
    #: options say how much to prune (random_coarse's per-layer channel / kernel ratios)
    goal: ClassVar[str] = "sparsity"

    def __init__(self, **options: Any) -> None:
        self.options = validate_options(self.Options, self.name, options)

    def run(self, ctx: Context) -> PruningResult:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_fraction(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"`{label}` must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{label}` must lie in [0, 1) (a fraction, e.g. 0.9 for 90%), got {value}")
    return float(value)


class DeviceBatches:
    """Validation batches kept once per device: moved on first use there, then reused, so no
    candidate pays a host-to-device copy (on CPU the batches are used as given)."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = list(batches)
        self._moved: dict[str, tuple[list, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.batches)

    def on(self, dev: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """(batches, all labels concatenated) on ``dev``."""
        key = str(dev)
        if key not in self._moved:
            pin = dev.type == "cuda"
            moved = [(_move(x, dev, pin), _move(y, dev, pin)) for x, y in self.batches]
            self._moved[key] = (moved, torch.cat([y for _, y in moved]))
        return self._moved[key]


def _move(t: Any, dev: torch.device, pin: bool) -> Any:
    if not isinstance(t, torch.Tensor) or t.device == dev:
        return t
    return (t.pin_memory() if pin and t.device.type == "cpu" else t).to(dev, non_blocking=pin)


def evaluator_from_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], metric: str | Callable) -> Evaluate:
    """Build ``evaluate(model)`` from validation batches and a metric; the batches are cached once
    (per device) and the model is run under ``torch.inference_mode``."""
    cached = DeviceBatches([(x, y) for x, y in batches])
    if not len(cached):
        raise ValueError("`val_data` is empty")
    fn = get_metric(metric) if isinstance(metric, str) else metric
    from .metrics import accuracy

    def evaluate(model: nn.Module) -> float:
        data, labels = cached.on(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                if fn is accuracy:  # keep only each batch's predictions: the same value, less memory traffic
                    preds = torch.cat([model(x).argmax(1) for x, _ in data])
                    return float((preds == labels).float().mean())
                out = torch.cat([model(x) for x, _ in data])
        finally:
            model.train(was_training)
        return fn(out, labels)

    evaluate.batches = cached  # the scorer's early rejection reads the same device copies
    return evaluate


def prune(
    model: nn.Module,
    name: str,
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
    Remaining keyword ``options`` go to the pruner and are validated. The input model is copied
    unless ``inplace=True``.
    """
    cls = get_pruner_class(name)
    pruner = cls(**options)
    if cls.goal == "ratios":
        if sparsity is not None or max_accuracy_drop is not None:
            raise ValueError(f"pruner {name!r} is driven by its ratio options (e.g. feature_map_ratio=0.5, "
                             f"kernel_ratio=0.3), not by `sparsity` / `max_accuracy_drop`")
    elif (sparsity is None) == (max_accuracy_drop is None):
        raise ValueError(
            "give exactly one of `sparsity` (a budget, e.g. sparsity=0.9) or `max_accuracy_drop` "
            "(an accuracy constraint, e.g. max_accuracy_drop=0.005)"
        )
    if sparsity is not None:
        sparsity = _check_fraction("sparsity", sparsity)
    if max_accuracy_drop is not None:
        max_accuracy_drop = _check_fraction("max_accuracy_drop", max_accuracy_drop)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if evaluate is not None and val_data is not None:
        raise ValueError("give either `evaluate` or `val_data`, not both")
    val_batches = train_batches = None
    if val_data is not None:
        val_batches = [tuple(b) if isinstance(b, (tuple, list)) else b for b in val_data]
        evaluate = evaluator_from_batches(val_batches, metric)
    if train_data is not None:
        train_batches = list(train_data)
        if not train_batches:
            raise ValueError("`train_data` is empty")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"`evaluate` must be callable as evaluate(model) -> float, got {type(evaluate).__name__}")
    if finetune is not None and not callable(finetune):
        raise TypeError(f"`finetune` must be callable as finetune(model, epochs), got {type(finetune).__name__}")
    if evaluate is None and (cls.needs_evaluate or max_accuracy_drop is not None):
        need = "max_accuracy_drop" if max_accuracy_drop is not None else f"pruner {name!r}"
        raise ValueError(f"{need} needs `evaluate` (a callable model -> float) or `val_data` batches")
    if not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an integer, got {seed!r}")
    targets = find_targets(model, layers, layer_types, exclude)

    work = model if inplace else copy.deepcopy(model)
    snapshot = copy.deepcopy(model.state_dict()) if inplace else None
    metric_fn = None if val_batches is None else (get_metric(metric) if isinstance(metric, str) else metric)
    ctx = Context(work, targets, evaluate, finetune, sparsity, max_accuracy_drop, int(seed), progress,
                  train_batches, val_batches, metric_fn)
    t0 = time.perf_counter()
    try:
        result = pruner.run(ctx)
    except BaseException:
        if snapshot is not None:  # never leave the user's model half-pruned
            model.load_state_dict(snapshot)
        raise
    result.wall_time = time.perf_counter() - t0
    result.pruner = name
    result.seed = int(seed)
    result.options = pruner.options.model_dump()
    targets = ctx.targets  # a pruner may report more layers than it was given (random_coarse's consumers)
    result.layer_sparsity = layer_sparsity(result.masks)
    kept = sum(int(m.sum()) for m in result.masks.values())
    total = sum(m.numel() for m in result.masks.values())
    result.sparsity = 1.0 - kept / total
    result.layers = [
        {"name": t.name, "type": t.module_type, "shape": list(t.shape), "params": t.numel,
         "kept": int(result.masks[t.name].sum()), "sparsity": result.layer_sparsity[t.name]}
        for t in targets
    ]
    result.model = work
    return result
