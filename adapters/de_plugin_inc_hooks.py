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

        if de_plugin_inc.ROUTE == "legacy":
            print(f"INC {de_plugin_inc.INC_VERSION}: pruning_type='de_layerwise' is registered (INC 3.7 pruning loop)")
        elif de_plugin_inc.ROUTE == "inc3":
            print(f"INC {de_plugin_inc.INC_VERSION}: DELayerwiseConfig is registered (INC 3.x quantize / autotune; "
                  "de_plugin_inc.prune_and_quantize)")
        else:
            print(de_plugin_inc.INC_ERROR)
        return 0

    p.set_defaults(func=run)
