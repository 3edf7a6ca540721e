"""What a pruning run returns, and how it is saved and re-applied."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Outcome:
    """What a pruner's ``run`` returns; :func:`de_plugin.prune` builds the :class:`PruningResult`.

    ``masks`` cover the weights the result reports on (``targets``); ``extra_masks`` are further
    masks a pruner applied (random_coarse: biases, BatchNorm terms) that are saved with them.
    """

    masks: dict[str, torch.Tensor]
    targets: list[Any]
    history: list[dict[str, Any]]
    nfev: int
    accuracy: float | None
    reference_accuracy: float | None
    extra_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruningResult:
    """Masks and measurements of one run. ``model`` is the pruned copy (weights zeroed)."""

    pruner: str
    masks: dict[str, torch.Tensor]
    sparsity: float
    layer_sparsity: dict[str, float]
    accuracy: float | None
    reference_accuracy: float | None
    history: list[dict[str, Any]]
    nfev: int
    wall_time: float
    model: nn.Module | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    #: pruner-specific measurements (random_coarse: MACs, parameters, kept channels, candidate scores)
    extra: dict[str, Any] = field(default_factory=dict)
    #: masks of parameters beyond the reported weights (random_coarse: biases and BatchNorm terms)
    extra_masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """1 / (1 - sparsity) over the pruned layers' weights (ALGORITHMS.md section 0)."""
        return float("inf") if self.sparsity >= 1.0 else 1.0 / (1.0 - self.sparsity)

    def summary(self) -> dict[str, Any]:
        return {
            "pruner": self.pruner,
            "seed": self.seed,
            "sparsity": self.sparsity,
            "compression": self.compression,
            "layer_sparsity": self.layer_sparsity,
            "accuracy": self.accuracy,
            "reference_accuracy": self.reference_accuracy,
            "accuracy_drop": None
            if self.accuracy is None or self.reference_accuracy is None
            else self.reference_accuracy - self.accuracy,
            "nfev": self.nfev,
            "wall_time": self.wall_time,
            "layers": self.layers,
            "options": self.options,
            "history": self.history,
            **{k: v for k, v in self.extra.items() if not isinstance(v, dict) or not any(
                isinstance(t, torch.Tensor) for t in v.values())},
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.summary(), indent=kwargs.pop("indent", 2), default=_jsonable, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write masks and summary atomically (temporary file, then rename)."""
        masks = {**self.masks, **self.extra_masks}
        payload = {"format": "de_plugin.masks/1", "masks": {k: v.cpu().bool() for k, v in masks.items()},
                   "summary": json.loads(self.to_json())}
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Apply masks saved by ``PruningResult.save`` to ``model`` in place (zeroing pruned weights).

    Every name and shape is checked before any weight is touched, so a mismatch leaves the
    model as it was.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no masks file at {path} (write one with PruningResult.save)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - random bytes, truncated zip, wrong format
        raise ValueError(f"masks file {path} is corrupt or truncated ({type(exc).__name__}); write it again with "
                         f"PruningResult.save (the model was not touched)") from None
    if not isinstance(payload, dict) or payload.get("format") != "de_plugin.masks/1":
        raise ValueError(f"{path} is not a de_plugin masks file (written by PruningResult.save)")
    params = dict(model.named_parameters())
    problems = []
    for name, m in payload["masks"].items():
        if name not in params:
            problems.append(f"{name}: no such parameter in the model")
        elif tuple(params[name].shape) != tuple(m.shape):
            problems.append(f"{name}: mask shape {tuple(m.shape)} != parameter shape {tuple(params[name].shape)}")
    if problems:
        raise ValueError("masks do not fit this model: " + "; ".join(problems))
    with torch.no_grad():
        for name, m in payload["masks"].items():
            params[name].mul_(m.to(params[name].device, params[name].dtype))
    return model
