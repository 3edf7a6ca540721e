"""Intel Neural Compressor (3.7, 2.x pruning API) adapter of de-plugin.

``import de_plugin_inc`` registers ``pruning_type="de_layerwise"`` with INC's pruner registry, so

    WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate}],
                        target_sparsity=0.9, pattern="1x1", start_step=0, end_step=100)

works in INC's usual loop, and so do ``pruning_type="random_coarse"`` (whole filters,
``pattern="1x{kh*kw*C_in}"``) and ``pruning_type="de_channel"`` (whole filters under the budget of
``channel_options={"macs": 0.5}``) (``prepare_pruning`` / ``prepare_compression``). ``search_config(...)``
runs the search up front and returns a ready ``WeightPruningConfig`` with per-layer targets.
Importing never fails when INC is missing; using the adapter then says how to install it.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

log = logging.getLogger("de_plugin_inc")
# Quirk (INC 3.7.1 + setuptools 80): importing INC warns "pkg_resources is deprecated" on every run
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
INC_AVAILABLE = False
try:  # registering with INC is what importing this package is for
    from .pruner import PytorchDEChannelPruner, PytorchDELayerwisePruner, PytorchRandomCoarsePruner  # noqa: F401

    INC_AVAILABLE = True
except ImportError as exc:  # pragma: no cover - exercised only without INC
    log.debug("Intel Neural Compressor not available: %s", exc)

_LAZY = {"search_config": "de_plugin_inc.config", "search_layer_targets": "de_plugin_inc.search",
         "quantize": "de_plugin_inc.quantization", "int8_weights": "de_plugin_inc.quantization"}


def require_inc() -> None:
    if not INC_AVAILABLE:
        raise ImportError("de_plugin_inc needs Intel Neural Compressor 3.7: "
                          "pip install 'de-plugin[inc]' (neural-compressor>=3.7,<3.8, setuptools<81, six)")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_inc()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'de_plugin_inc' has no attribute {name!r}")
