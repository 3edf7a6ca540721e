"""de-plugin: differential-evolution layer-wise pruning and coarse random-mask pruning.

Quick start::

    import de_plugin
    result = de_plugin.prune(model, "de_layerwise", evaluate=val_acc, finetune=train, sparsity=0.95)
    result.model, result.masks, result.layer_sparsity
"""
from .pruner import Pruner, prune
from .registry import create_pruner, list_metrics, list_pruners, register_pruner
from .result import PruningResult
from .weights.rounds import IterativePruner
from .saving import load, save_model
from .lm import prune_lm

__all__ = [
    "prune",
    "list_pruners",
    "create_pruner",
    "register_pruner",
    "list_metrics",
    "Pruner",
    "IterativePruner",
    "PruningResult",
    "load",
    "save_model",
    "prune_lm",
]
__version__ = "0.1.0"
