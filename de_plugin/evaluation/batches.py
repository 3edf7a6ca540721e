"""Scores and batches: the one place a user's score is checked (:func:`check_score`), validation and
training batches checked and moved to a device once, a model evaluated on them."""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..metrics import accuracy
from ..registry import get_metric
from ..targets import Target


class Bound(float):
    """Upper bound on the score of a candidate rejected early: it is below the candidate's floor, so
    the candidate cannot win; callers must not cache it as the candidate's exact score.
    ``images_left`` is how many validation images the rejection saved."""

    def __new__(cls, value: float, images_left: int = 0) -> "Bound":
        obj = super().__new__(cls, value)
        obj.images_left = int(images_left)
        return obj

    def __reduce__(self):  # pickled across process / Ray workers with its count
        return (Bound, (float(self), self.images_left))


#: how far below its floor a candidate's upper bound must be before it is rejected; covers float32
#: rounding of the metric (accuracy is a float32 mean), so a rejected candidate truly scores < floor
REJECT_MARGIN = 1e-5


def check_score(value: Any) -> float:
    """The user's score as a finite float, or an error that says what came back."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`evaluate` must return a number (accuracy, higher is better), got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`evaluate` returned {value}; it must return a finite number (check the model and data)")
    return value


def check_device(name: str) -> torch.device:
    """``torch.device(name)``, refused up front when this machine cannot use it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={name!r} is not a torch device ({exc}); use e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but torch has no CUDA on this machine (torch.cuda.is_available() is "
                         "False); drop `device` or use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}, but MPS is not available on this machine; drop `device` or use 'cpu'")
    return dev


def check_batches(data: Any, name: str, pairs: bool) -> list:
    """``data`` as a list of batches, or an error naming ``name`` and the expected form. With
    ``pairs`` every batch must be ``(inputs, targets)``; else a batch may also be an input tensor."""
    form = "(inputs, targets) batches" if pairs else "batches ((inputs, targets) pairs or input tensors)"
    if isinstance(data, torch.Tensor):
        raise TypeError(f"`{name}` must be an iterable of {form}, e.g. a DataLoader or [(x, y), ...]; got one "
                        f"tensor of shape {tuple(data.shape)}: wrap it as [(x, y)] or split it into batches")
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"`{name}` must be an iterable of {form}, got {type(data).__name__}") from None
    if not batches:
        raise ValueError(f"`{name}` is empty")
    for i, b in enumerate(batches):
        ok = isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], torch.Tensor) if pairs else \
            isinstance(b, torch.Tensor) or (isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor))
        if not ok:
            raise TypeError(f"`{name}` must be an iterable of {form}; batch {i} is {type(b).__name__}"
                            + (f" of length {len(b)}" if isinstance(b, (tuple, list)) else ""))
    return [tuple(b) if isinstance(b, list) else b for b in batches]


@contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the block; the model's train/eval mode comes back afterwards,
    also when the block raises (a user's model must not stay in eval mode after a failed score)."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was)


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


def metric_on_batches(model: nn.Module, batches: DeviceBatches, metric: Callable) -> float:
    """``metric(outputs, labels)`` of ``model`` over the cached batches (on the model's device)."""
    data, labels = batches.on(next(model.parameters()).device)
    with inference(model):
        if metric is accuracy:  # keep only each batch's predictions: the same value, less memory traffic
            preds = torch.cat([model(x).argmax(1) for x, _ in data])
            return float((preds == labels).float().mean())
        out = torch.cat([model(x) for x, _ in data])
    return metric(out, labels)


def evaluator_from_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                           metric: str | Callable) -> Callable[[nn.Module], float]:
    """Build ``evaluate(model)`` from validation batches and a metric; the batches are cached once
    (per device) and the model is run under ``torch.inference_mode``."""
    cached = DeviceBatches([(x, y) for x, y in batches])
    if not len(cached):
        raise ValueError("`val_data` is empty")
    fn = get_metric(metric) if isinstance(metric, str) else metric

    def evaluate(model: nn.Module) -> float:
        return metric_on_batches(model, cached, fn)

    evaluate.batches = cached  # the scorer's early rejection reads the same device copies
    return evaluate


#: ``low_memory=None`` turns the low-memory search on above this many searched weights (the int32
#: ranks alone would hold 200 MB there)
LOW_MEMORY_AUTO = 50_000_000


def low_memory_for(option: Optional[bool], targets: Sequence[Target]) -> bool:
    """Whether a search over ``targets`` runs in low-memory mode: the option, or by size when None."""
    return bool(option) if option is not None else sum(t.numel for t in targets) > LOW_MEMORY_AUTO
