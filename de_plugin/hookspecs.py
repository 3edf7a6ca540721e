"""Plugin hooks of de-plugin (pluggy). Built-in pruners register through these same hooks."""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("de_plugin")
hookimpl = pluggy.HookimplMarker("de_plugin")


@hookspec
def register_pruners():
    """Return a list of pruner classes (subclasses of ``de_plugin.pruner.Pruner``).

    Each class names itself with a ``name`` attribute; ``de_plugin.list_pruners()`` then lists
    it and ``de_plugin.prune(model, name, ...)`` runs it.
    """


@hookspec
def register_fitness_metrics():
    """Return a dict ``name -> metric(outputs, targets) -> float`` (higher is better).

    A metric scores a model on validation batches when ``prune(..., val_data=..., metric=name)``
    is used instead of an ``evaluate`` callable.
    """


@hookspec
def register_allocations():
    """Return a dict ``name -> rule(weights, sparsity, ranks=None) -> keep-counts``: a per-layer allocation.

    ``weights`` are the pruned layers' weight tensors, ``sparsity`` the overall fraction to prune; the rule
    returns one integer keep-count per layer summing exactly to ``round(N * (1 - sparsity))`` (``ranks``,
    when given, are each weight's magnitude rank, 0 = largest). Each rule seeds ``de_layerwise``'s search
    (and INC's) beside the built-in ones and becomes a baseline pruner of its own name (magnitude inside
    each layer, the same rounds and recovery as ``lamp`` or ``erk``).
    """


@hookspec
def register_commands(subparsers):
    """Add sub-commands to the ``de-plugin`` command line (an ``argparse`` subparsers object).

    Framework adapters use it to run their own config files from the core's command line.
    """
