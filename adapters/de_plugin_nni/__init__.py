"""NNI 3.0 adapter of de-plugin: ``de_layerwise`` as an NNI pruner, selected by name.

    import de_plugin_nni
    pruner = de_plugin_nni.create_pruner("de_layerwise", model, config_list, evaluator, rounds=3)
    model, masks = pruner.compress()

Importing this package never fails when NNI is missing; using a name that needs NNI raises an
ImportError that says how to install it.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

# Quirk (NNI 3.0 on torch 2.13): nni.compression.speedup registers torch.fx's immutable collections as
# pytree nodes with a deprecated call, warning twice per import; the registration itself is harmless
warnings.filterwarnings("ignore", message=".*_register_pytree_node.*is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*immutable_(dict|list).*already registered as pytree node",
                        category=UserWarning)

_LAZY = {
    "DELayerwisePruner": "de_plugin_nni.pruner",
    "RandomCoarsePruner": "de_plugin_nni.coarse",
    "DEChannelPruner": "de_plugin_nni.channel",
    "create_pruner": "de_plugin_nni.names",
    "list_pruners": "de_plugin_nni.names",
    "PRUNERS": "de_plugin_nni.names",
    "speedup": "de_plugin_nni.tracing",
    "patch_concrete_tracer": "de_plugin_nni.tracing",
    "run_config": "de_plugin_nni.config",
    "load_config": "de_plugin_nni.config",
    "export_config_list": "de_plugin_nni.pruner",
}
__all__ = sorted(_LAZY)


def require_nni() -> None:
    """Raise a helpful ImportError when NNI is not installed."""
    try:
        import nni  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without NNI
        raise ImportError(
            "de_plugin_nni needs NNI 3.0: install it with `pip install 'de-plugin[nni]'` (nni==3.0)"
        ) from exc


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_nni()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'de_plugin_nni' has no attribute {name!r}")
