"""Intel Neural Compressor adapter of de-plugin: two routes, chosen by the INC installed.

**INC 3.8+** (``pip install 'de-plugin[inc]'``: ``neural-compressor-pt``, ``torchao``, ``accelerate``; INC
3.8 removed its pruning API): ``import de_plugin_inc`` registers :class:`DELayerwiseConfig` with INC 3.x's
config and algorithm registries, so ``quantize(model, DELayerwiseConfig(target_sparsity=0.9,
eval_fn=evaluate))`` prunes and ``autotune`` tunes over it; :func:`prune_and_quantize` prunes then
quantizes (PT2E static / dynamic int8, RTN weight-only) with the pruned zeros checked after
quantization; :func:`save` / :func:`load` store the result as sparse int8. :class:`DEChannelConfig`
(``de_channel``: channel counts under a MACs / parameter / latency budget) makes the model physically
smaller the same two ways.

**INC 3.7** (``pip install 'de-plugin[inc-legacy]'``, the 2.x pruning API): ``import de_plugin_inc``
registers ``pruning_type="de_layerwise"`` with INC's pruner registry, so

    WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate}],
                        target_sparsity=0.9, pattern="1x1", start_step=0, end_step=100)

works in INC's usual loop, and so do ``pruning_type="random_coarse"`` (whole filters,
``pattern="1x{kh*kw*C_in}"``) and ``pruning_type="de_channel"`` (whole filters under the budget of
``channel_options={"macs": 0.5}``) (``prepare_pruning`` / ``prepare_compression``). ``search_config(...)``
runs the search up front and returns a ready ``WeightPruningConfig`` with per-layer targets.

Importing never fails: without a usable INC, using the adapter says what is installed and which
extra to install (:func:`require_inc`).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import warnings
from typing import Any, Optional

log = logging.getLogger("de_plugin_inc")
# Quirk (INC 3.7.1 + setuptools 80): importing INC warns "pkg_resources is deprecated" on every run
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

LEGACY_EXTRA = "pip install 'de-plugin[inc-legacy]' (neural-compressor>=3.7,<3.8, setuptools<81, six)"
CURRENT_EXTRA = "pip install 'de-plugin[inc]' (neural-compressor-pt>=3.8, torchao, accelerate)"


def inc_version() -> Optional[str]:
    """The installed INC release (``neural-compressor`` or ``neural-compressor-pt``), or None."""
    found = []
    for dist in ("neural-compressor-pt", "neural-compressor"):
        try:
            found.append(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
    return max(found, key=_release) if found else None


def _release(v: str) -> tuple:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def route_for(version: Optional[str]) -> tuple[Optional[str], str]:
    """The route an INC release takes ("legacy", "inc3" or None) and, for None, what to tell the user."""
    if version is None:
        return None, f"Intel Neural Compressor is not installed: {CURRENT_EXTRA}, or for INC 3.7's pruning loop {LEGACY_EXTRA}"
    if _release(version) < (3, 7):
        return None, (f"neural-compressor {version} has neither route de_plugin_inc supports (3.7's pruning API, "
                      f"3.8+'s config registry): {CURRENT_EXTRA}")
    return ("legacy" if _release(version) < (3, 8) else "inc3"), ""


INC_VERSION = inc_version()
ROUTE, INC_ERROR = route_for(INC_VERSION)
if ROUTE is not None:
    try:  # registering with INC is what importing this package is for
        if ROUTE == "legacy":
            from .pruner import PytorchDEChannelPruner, PytorchDELayerwisePruner, PytorchRandomCoarsePruner  # noqa: F401
        else:
            from .quiet3 import quiet_inc3

            quiet_inc3()  # before INC's first import: it warns as it loads
            from .inc3 import DELayerwiseConfig  # noqa: F401
    except ImportError as exc:
        # e.g. INC 3.10 without its PyTorch flavour: `neural_compressor.torch` fails on a missing dependency
        INC_ERROR = (f"neural-compressor {INC_VERSION} is installed but cannot be used ({exc}); "
                     f"{CURRENT_EXTRA if ROUTE == 'inc3' else LEGACY_EXTRA}")
        log.debug("INC route %s unavailable: %s", ROUTE, exc)
        ROUTE = None
INC_AVAILABLE = ROUTE is not None

_LEGACY = {"search_config": "de_plugin_inc.config", "search_layer_targets": "de_plugin_inc.search",
           "prune_with_inc": "de_plugin_inc.lm", "pruning_configs": "de_plugin_inc.lm",
           "quantize": "de_plugin_inc.quantization", "int8_weights": "de_plugin_inc.quantization"}
_CURRENT = {"DELayerwiseConfig": "de_plugin_inc.inc3", "DEChannelConfig": "de_plugin_inc.channels3",
            "prune_and_quantize": "de_plugin_inc.pt2e",
            "int_weights": "de_plugin_inc.pt2e", "zeros_kept": "de_plugin_inc.pt2e",
            "save": "de_plugin_inc.storage", "load": "de_plugin_inc.storage"}


def require_inc(route: Optional[str] = None) -> None:
    """Raise ImportError (what is installed, what to install) unless INC's ``route`` is usable."""
    if not INC_AVAILABLE:
        raise ImportError(f"de_plugin_inc: {INC_ERROR}")
    if route is not None and route != ROUTE:
        need = (f"INC 3.7's pruning API: {LEGACY_EXTRA}" if route == "legacy"
                else f"INC 3.8 or newer: {CURRENT_EXTRA}")
        raise ImportError(f"de_plugin_inc: this needs {need}; neural-compressor {INC_VERSION} is installed")


def __getattr__(name: str) -> Any:
    for route, table in (("legacy", _LEGACY), ("inc3", _CURRENT)):
        if name in table:
            require_inc(route)
            return getattr(importlib.import_module(table[name]), name)
    raise AttributeError(f"module 'de_plugin_inc' has no attribute {name!r}")
