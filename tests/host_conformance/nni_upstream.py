"""NNI v3.0's own pruner tests (``test/algo/compression/pruning/test_pruner.py``), row by row, for the
built-in pruners: ``test_norm_pruner`` (level, l1, l2, fpgm), ``test_slim_taylor_pruner`` (slim, taylor;
100 training steps), ``test_mvp_pruner`` (movement, 100 steps) and ``test_scheduled_pruner`` (AGP and
Linear over the six sub-pruners, 100 steps), each for a TorchEvaluator and a LightningEvaluator model,
with upstream's ``check_masks`` and ``check_pruned_simple_model`` (``nni_assets``).

``python nni_upstream.py`` runs every row in a process that never imports ``de_plugin_nni``'s pruners,
so NNI's ``LightningEvaluator`` is NNI's own, and prints one JSON line ``{row: "passed" | error}``.
The one thing applied there is the concrete-tracer fix ModelSpeedup needs on torch 2.13
(``de_plugin_nni.tracing.patch_concrete_tracer``; without it no ModelSpeedup runs at all).
Differences from upstream besides the assets' (see ``nni_assets``): dependency groups from
``nni.compression.utils.auto_set_denpendency_group_ids`` exactly as upstream (it needs TensorBoard,
installed with the test extra).
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nni_assets import check_masks, check_pruned_simple_model, create, fashion_subset  # noqa: E402

SUBS = ["level", "l1", "l2", "fpgm", "slim", "taylor"]
ROWS = ([f"norm-{m}-{p}" for m in ("pytorch", "lightning") for p in ("level", "l1", "l2", "fpgm")]
        + [f"slim_taylor-{m}-{p}" for m in ("pytorch", "lightning") for p in ("slim", "taylor")]
        + [f"mvp-{m}-movement" for m in ("pytorch", "lightning")]
        + [f"scheduled-{m}-{s}-{sub}" for m in ("pytorch", "lightning") for s in ("agp", "linear") for sub in SUBS])
#: rows whose pruner trains through the evaluator: with NNI 3.0's own LightningEvaluator on
#: pytorch-lightning 2.x these fail (``fit_loop.max_steps`` became read-only)
TRAINS = {r for r in ROWS if not r.startswith("norm-")}


def pruners():
    from nni.compression.pruning import (AGPPruner, FPGMPruner, L1NormPruner, L2NormPruner, LevelPruner,
                                         LinearPruner, MovementPruner, SlimPruner, TaylorPruner)

    return {"level": LevelPruner, "l1": L1NormPruner, "l2": L2NormPruner, "fpgm": FPGMPruner, "slim": SlimPruner,
            "taylor": TaylorPruner, "movement": MovementPruner, "agp": AGPPruner, "linear": LinearPruner}


def build(row: str, model, evaluator, config_list):
    """The pruner upstream's test builds for ``row``, and the arguments of its ``compress``."""
    kind, _, name, *sub = row.split("-")
    P = pruners()
    if kind == "norm":
        return P[name](model, config_list), ()
    if kind == "slim_taylor":
        return P[name](model, config_list, evaluator=evaluator, training_steps=100), ()
    if kind == "mvp":
        return P["movement"](model, config_list, evaluator=evaluator, warmup_step=10, cooldown_begin_step=90), (100, None)
    if sub[0] in ("slim", "taylor"):
        inner = P[sub[0]](model, config_list, evaluator=evaluator, training_steps=10)
        return P[name](inner, interval_steps=10, total_times=10), (100, None)
    return P[name](P[sub[0]](model, config_list), interval_steps=10, total_times=10, evaluator=evaluator), (100, None)


def run_row(row: str, data) -> None:
    """One upstream test row; raises AssertionError (or NNI's error) where upstream's would fail."""
    from nni.compression.speedup import ModelSpeedup
    from nni.compression.utils import auto_set_denpendency_group_ids

    model_type = row.split("-")[1]
    model, evaluator, config_list, dummy = create(model_type, data)
    config_list = auto_set_denpendency_group_ids(model, copy.deepcopy(config_list), dummy)
    pruner, args = build(row, model, evaluator, config_list)
    pruner.compress(*args)
    pruner.unwrap_model()
    masks = pruner.get_masks()
    check_masks(masks, model_type)
    pruned = ModelSpeedup(model, dummy, masks).speedup_model()
    ori_model, _, _, _ = create(model_type, data)
    check_pruned_simple_model(pruned, ori_model, dummy, model_type)


def run_all(rows=ROWS) -> dict:
    torch.manual_seed(0)
    data = fashion_subset()
    out = {}
    for row in rows:
        try:
            run_row(row, data)
            out[row] = "passed"
        except Exception as exc:  # noqa: BLE001 - reported per row
            out[row] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return out


def main() -> None:
    import logging

    logging.disable(logging.INFO)  # NNI logs every speedup step
    from nni.compression.utils import evaluator as ev

    original = ev.LightningEvaluator.train
    from de_plugin_nni.tracing import patch_concrete_tracer

    patch_concrete_tracer()
    results = run_all(sys.argv[1:] or ROWS)
    assert ev.LightningEvaluator.train is original, "the Lightning patch must not be applied in this process"
    assert not any(m.startswith("de_plugin_nni.pruner") or m == "de_plugin_nni.evaluators" for m in sys.modules), \
        sorted(m for m in sys.modules if m.startswith("de_plugin_nni"))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
