"""Pruners by name, timm-style: ``@register_pruner``, ``list_pruners("de*")``, ``create_pruner``."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

_PRUNERS: dict[str, type] = {}
_METRICS: dict[str, Callable] = {}
_ALLOCATIONS: dict[str, Callable] = {}
_synced = False


def register_pruner(cls: type) -> type:
    """Class decorator: make a pruner available by its ``name`` (for scripts; packages use the hook)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls!r} needs a non-empty string attribute `name` to be registered")
    other = _PRUNERS.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"a pruner named {name!r} is already registered ({other.__module__}.{other.__qualname__})")
    _PRUNERS[name] = cls
    return cls


def _sync() -> None:
    global _synced
    if _synced:
        return
    from .plugins import load_plugins

    pm = load_plugins()
    _synced = True
    for rules in pm.hook.register_allocations():  # first: the baselines' hook makes pruners of them
        _ALLOCATIONS.update(rules or {})
    for classes in pm.hook.register_pruners():
        for cls in classes or ():
            register_pruner(cls)
    for metrics in pm.hook.register_fitness_metrics():
        _METRICS.update(metrics or {})


def list_pruners(pattern: str = "*") -> list[str]:
    """Sorted names of the available pruners, filtered by an fnmatch pattern."""
    _sync()
    return sorted(n for n in _PRUNERS if fnmatch.fnmatchcase(n, pattern))


def lookup(table: dict[str, Any], name: Any, what: str) -> Any:
    """``table[name]``, or a ValueError naming the closest entry and every valid one (timm-style);
    shared by the core's registries and the adapters' (NNI has no registry of its own)."""
    if not isinstance(name, str) or name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=3, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {what} {name!r}.{hint} Available {what}s: {', '.join(sorted(table))}")
    return table[name]


def get_pruner_class(name: str) -> type:
    _sync()
    return lookup(_PRUNERS, name, "pruner")


def create_pruner(name: str, options: Any = None, /, **kwargs: Any):
    """Instantiate a pruner by name; its options (keywords, or the pruner's ``Options`` object) are validated
    before any work."""
    return get_pruner_class(name)(options, **kwargs)


def registered_allocations() -> dict[str, Callable]:
    """The allocation rules plugins registered (``register_allocations``), by name, in registration order."""
    _sync()
    return dict(_ALLOCATIONS)


def list_metrics() -> list[str]:
    _sync()
    return sorted(_METRICS)


def get_metric(name: str) -> Callable:
    _sync()
    return lookup(_METRICS, name, "fitness metric")
