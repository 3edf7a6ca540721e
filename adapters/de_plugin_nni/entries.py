"""NNI ``config_list`` entries, checked before NNI wraps anything (every pruner ``create_pruner`` builds).

NNI 3.0 checks an entry's shape with its schema but not its sense: an ``op_names`` entry naming
no module fails later with a bare ``KeyError``, a ``sparse_ratio`` of 1.2 masks every weight, and
``max_sparse_ratio`` below ``min_sparse_ratio`` only fails once training ran. Here each is an
error that names the entry and the key. Legacy keys NNI still accepts (``sparsity``,
``sparsity_per_layer``, ``total_sparsity``, ``max_sparsity_per_layer``, ``op_partial_names``,
``exclude``) are translated by NNI's own ``trans_legacy_config_list`` first.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, List, Optional

from nni.compression.base.config import default_config_schema, trans_legacy_config_list
from schema import SchemaError
from torch import nn

#: keys of an entry (top level or in ``target_settings["weight"]``) that set how a layer is pruned
SETTINGS = ("sparse_ratio", "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio", "global_group_id",
            "dependency_group_id", "internal_metric_block", "granularity", "apply_method", "align")


def setting(cfg: Dict[str, Any], key: str) -> Any:
    """An entry's weight setting, top level or in ``target_settings['weight']`` (NNI's legacy form)."""
    if cfg.get(key) is not None:
        return cfg[key]
    return ((cfg.get("target_settings") or {}).get("weight") or {}).get(key)


def validated_entries(model: nn.Module, config_list: List[Dict], pruner: str, example: str,
                      unsupported: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """``config_list`` in NNI's current form, every entry checked: NNI's schema, module names,
    ratio ranges and, for our pruners, the settings they cannot honour (``unsupported``: key ->
    why and what to do)."""
    if not isinstance(config_list, list) or not config_list or not all(isinstance(c, dict) for c in config_list):
        raise ValueError(f"config_list must be a non-empty list of dicts, e.g. [{example}]")
    configs = trans_legacy_config_list([dict(c) for c in config_list])
    schema = default_config_schema("pruning")
    modules = dict(model.named_modules())
    known = _schema_keys(schema)
    for i, cfg in enumerate(configs):
        _check_keys(i, cfg, known, pruner)
        _check_ratios(i, cfg)  # before the schema: `sparse_ratio: 95` is a range error, not a key error
        try:
            schema.validate(cfg)
        except SchemaError as exc:
            raise ValueError(f"config_list entry {i} is not valid for NNI: {exc}. "
                             f"({pruner} options go to the pruner's constructor, not into config_list)") from None
        _check_names(i, cfg.get("op_names") or [], modules)
        for key, why in (unsupported or {}).items():
            value = setting(cfg, key)
            if value is not None and not (key == "granularity" and value in ("default", "out_channel")):
                raise ValueError(f"config_list entry {i}: {pruner} does not support {key}={value!r}: {why}")
    return configs


def _schema_keys(schema: Any) -> List[str]:
    """The keys NNI's config schema knows (``Or('op_types', 'op_names', ...)`` spelled out)."""
    keys: List[str] = []
    for k in schema._schema:
        inner = getattr(k, "schema", k)
        keys.extend(getattr(inner, "_args", None) or [inner])
    return [k for k in keys if isinstance(k, str)]


def _check_keys(i: int, cfg: Dict[str, Any], known: List[str], pruner: str) -> None:
    """An unknown key (``sparse_raito``) is a typo until shown otherwise: name the nearest known key,
    or, for none near, say where pruner options go."""
    for key in cfg:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = (f"did you mean {near[0]!r}?" if near else
                    f"valid keys: {', '.join(sorted(known))} ({pruner} options go to the pruner's constructor, "
                    "not into config_list)")
            raise ValueError(f"config_list entry {i}: unknown key {key!r}, not valid for NNI; {hint}")


def _check_names(i: int, names: Iterable[str], modules: Dict[str, nn.Module]) -> None:
    missing = [n for n in names if n not in modules]
    if missing:
        prunable = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        raise ValueError(f"config_list entry {i}: op_names {missing} name no module of the model; its Conv/Linear "
                         f"modules are {prunable[:10]}{' ...' if len(prunable) > 10 else ''} "
                         "(use op_names_re for regular expressions)")


def _check_ratios(i: int, cfg: Dict[str, Any]) -> None:
    ratio, lo, hi = (setting(cfg, k) for k in ("sparse_ratio", "min_sparse_ratio", "max_sparse_ratio"))
    for key, v in (("sparse_ratio", ratio), ("min_sparse_ratio", lo), ("max_sparse_ratio", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"config_list entry {i}: {key}={v!r} must be a number in [0, 1)")
    if ratio is not None and not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"config_list entry {i}: sparse_ratio={ratio} must lie in [0, 1) (0.8 prunes 80%)")
    if lo is not None and not 0.0 <= float(lo) < 1.0:
        raise ValueError(f"config_list entry {i}: min_sparse_ratio={lo} must lie in [0, 1)")
    if hi is not None and not 0.0 < float(hi) <= 1.0:
        raise ValueError(f"config_list entry {i}: max_sparse_ratio={hi} must lie in (0, 1]")
    if lo is not None and hi is not None and float(hi) < float(lo):
        raise ValueError(f"config_list entry {i}: max_sparse_ratio={hi} is below min_sparse_ratio={lo}; "
                         "swap them or drop one")
    if ratio is not None and hi is not None and float(ratio) > float(hi):
        raise ValueError(f"config_list entry {i}: sparse_ratio={ratio} is above max_sparse_ratio={hi}")
