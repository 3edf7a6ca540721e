"""What a pruning run returns, and how it is saved and re-applied."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .saving import export_onnx, save_model


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
    #: the pruned weights as :class:`~de_plugin.targets.Target` objects (``layers`` is their display form)
    targets: list[Any] = field(default_factory=list)

    def __repr__(self) -> str:  # the masks, model and history would print whole
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.4f}"
        return (f"PruningResult(pruner={self.pruner!r}, sparsity={self.sparsity:.4f}, compression={self.compression:.1f}x, "
                f"layers={len(self.masks)}, accuracy={acc}, nfev={self.nfev}, wall_time={self.wall_time:.1f}s)")

    @property
    def compression(self) -> float:
        """1 / (1 - sparsity) over the pruned layers' weights (docs/ALGORITHMS.md, section 0)."""
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

    def save(self, path: str | os.PathLike, masks_only: bool = False) -> None:
        """Write the pruned model (weights and buffers), its masks and the summary atomically;
        ``de_plugin.load(path, model)`` gives back a model whose outputs equal ``self.model``'s.
        ``masks_only=True`` writes the masks alone (re-applied to whatever weights a model has)."""
        if self.model is None and not masks_only:
            raise ValueError("this result holds no model: save it with masks_only=True")
        save_model(path, self.model, {**self.masks, **self.extra_masks}, json.loads(self.to_json()), masks_only)

    def export_onnx(self, path: str | os.PathLike, example_inputs: Any, opset: int = 17) -> dict[str, Any]:
        """The pruned model as ONNX (see :func:`de_plugin.saving.export_onnx`); returns path and size."""
        if self.model is None:
            raise ValueError("this result holds no model to export")
        return export_onnx(self.model, path, example_inputs, opset)


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
