"""The one place where plugins are loaded: built-ins first, then the ``de_plugin`` entry points."""
from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

DEFAULT_PLUGINS = (
    "de_plugin.weights.layerwise",
    "de_plugin.weights.baselines",
    "de_plugin.channels.coarse",
    "de_plugin.channels.channel",
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
    # one entry point at a time (pluggy's load_setuptools_entrypoints stops at the first failure):
    # a broken or half-installed plugin must not hide the others nor break the core
    for ep in entry_points(group="de_plugin"):
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001
            log.warning("de_plugin entry point %r (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        pm.register(plugin, name=ep.name)
    return pm
