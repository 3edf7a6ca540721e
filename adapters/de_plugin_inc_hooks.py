"""The core's entry point into the INC adapter (group ``de_plugin``); imports nothing heavy.

A module of its own, outside the ``de_plugin_inc`` package, because importing that package
imports Intel Neural Compressor (several seconds) to register the pruner with it.

INC has no plugin discovery of its own: ``import de_plugin_inc`` registers the pruner with INC.
This hook only makes the adapter visible to the core (``de-plugin list`` shows INC's status).
"""
from __future__ import annotations

from de_plugin.hookspecs import hookimpl


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("inc-status", help="say whether the INC adapter can be used here")

    def run(_args) -> int:
        import de_plugin_inc

        print("INC adapter ready: pruning_type='de_layerwise' is registered" if de_plugin_inc.INC_AVAILABLE
              else "INC missing: pip install 'de-plugin[inc]'")
        return 0

    p.set_defaults(func=run)
