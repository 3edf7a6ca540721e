"""The one place where plugins are loaded: built-ins first, then the ``de_plugin`` entry points."""
from __future__ import annotations

import importlib
import logging

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

DEFAULT_PLUGINS = (
    "de_plugin.layerwise",
    "de_plugin.baselines",
    "de_plugin.metrics",
)

pm = pluggy.PluginManager("de_plugin")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register built-in plugins and installed ones (entry-point group ``de_plugin``), once."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for name in DEFAULT_PLUGINS:
        mod = importlib.import_module(name)
        if not pm.is_registered(mod):
            pm.register(mod, name)
    try:
        pm.load_setuptools_entrypoints("de_plugin")
    except Exception as exc:  # a broken third-party plugin must not break the core
        log.warning("a de_plugin entry point failed to load: %s", exc)
    return pm
