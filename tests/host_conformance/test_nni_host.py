"""NNI host conformance: the scenarios of NNI's own compression tests, with our pruner substituted
for the built-in one wherever a test accepts any pruner.

Scenarios written after (upstream tag v3.0, microsoft/nni):
* ``one_shot``  - test/algo/compression/pruning/test_pruner.py::test_norm_pruner (built-in: LevelPruner)
* ``evaluated`` - test/algo/compression/pruning/test_pruner.py::test_slim_taylor_pruner (built-in: TaylorPruner)
* ``agp`` / ``linear`` - test/algo/compression/pruning/test_pruner.py::test_scheduled_pruner (sub-pruner: level)
* ``lsq_fusion`` - test/algo/compression/test_fusion_compress.py (pruner.from_compressor + LsqQuantizer;
  the distiller stage is left out: it does not involve the pruner)
* ``qat_fusion`` - test/algo/compression/quantization/qat_test.py, fused with the pruner (built-in: TaylorPruner;
  a LevelPruner fused without a schedule never generates masks in NNI 3.0)

Assertions are those that apply to a search-based pruner: each config_list entry meets its budget
(over its layers for de_layerwise, per layer for the built-ins), masks are binary, masked weights
are zero at the end, the schedule is followed, fusion runs, and ModelSpeedup's output equals the
masked model's. Upstream's "every layer at exactly 0.75" and "speedup shrinks conv channels" are
properties of per-layer structured pruners and are not asserted for ours (de_layerwise prunes single
weights and allocates the entry's budget across its layers).
"""
import copy

import pytest
import torch

pytest.importorskip("nni")
pytest.importorskip("pytorch_lightning")

from nni.compression.pruning import AGPPruner, LevelPruner, LinearPruner, TaylorPruner  # noqa: E402
from nni.compression.quantization import LsqQuantizer, QATQuantizer  # noqa: E402

import de_plugin_nni  # noqa: E402
from nni_assets import create, entry_layers, fashion_subset  # noqa: E402

DE = {"population": 4, "generations": 1, "rounds": 1, "finetune_epochs": 1, "sensitivity_scan": False,
      "progress": False}
QCFG = [{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int8", "quant_scheme": "symmetric"}]


@pytest.fixture(scope="module")
def data():
    return fashion_subset()


def pruner_for(kind, scenario, model, cfg, evaluator):
    if kind == "ours":
        return de_plugin_nni.DELayerwisePruner(model, cfg, evaluator, **DE)
    if scenario in ("evaluated", "lsq_fusion", "qat_fusion"):  # LevelPruner fused without a schedule never masks
        return TaylorPruner(model, cfg, evaluator=evaluator, training_steps=4)
    return LevelPruner(model, cfg)


def run(kind, scenario, model, cfg, evaluator):
    inner = pruner_for(kind, scenario, model, cfg, evaluator)
    if scenario in ("agp", "linear"):
        cls = AGPPruner if scenario == "agp" else LinearPruner
        seen, original = [], inner.generate_masks

        def spy():
            out = original()
            seen.append(1 - sum(m["weight"].sum().item() for m in out.values()) / sum(
                m["weight"].numel() for m in out.values()))
            return out

        inner.generate_masks = spy
        sched = cls(inner, interval_steps=3, total_times=3, evaluator=None if kind == "ours" else evaluator)
        sched.compress(9, None)
        sched.unwrap_model()
        assert len(seen) == 3 and seen == sorted(seen), f"schedule not followed: {seen}"
        return sched.get_masks()
    if scenario in ("lsq_fusion", "qat_fusion"):
        cls = LsqQuantizer if scenario == "lsq_fusion" else QATQuantizer
        q = cls.from_compressor(inner, QCFG, evaluator=None if inner.evaluator is not None else evaluator)
        q.compress(6, None)
        q.unwrap_model()
        return inner.get_masks()
    inner.compress()
    inner.unwrap_model()
    return inner.get_masks()


SCENARIOS = ["one_shot", "evaluated", "agp", "linear", "lsq_fusion", "qat_fusion"]


@pytest.mark.parametrize("kind", ["builtin", "ours"])
@pytest.mark.parametrize("model_type", ["pytorch", "lightning"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(data, scenario, model_type, kind):
    model, evaluator, cfg, dummy = create(model_type, data)
    masks = run(kind, scenario, model, cfg, evaluator)
    for entry in entry_layers(model_type):
        w = [masks[n]["weight"] for n in entry]
        for m in w:
            assert set(torch.unique(m).tolist()) <= {0.0, 1.0}, "masks are binary"
        if kind == "ours":  # the entry's budget over its layers
            s = 1 - sum(m.sum().item() for m in w) / sum(m.numel() for m in w)
            assert s == pytest.approx(0.75, abs=1e-3), entry
        else:
            for m in w:
                assert 1 - m.mean().item() == pytest.approx(0.75, abs=0.02), entry
    net = model.model if model_type == "lightning" else model
    prefix = "model." if model_type == "lightning" else ""
    with torch.no_grad():  # masked weights are zero at the end (the wrappers are gone)
        for name, m in masks.items():
            net.get_submodule(name[len(prefix):]).weight.mul_(m["weight"])  # built-ins keep values behind masks
    if kind == "ours":
        for name, m in masks.items():
            assert torch.all(net.get_submodule(name[len(prefix):]).weight[m["weight"] == 0] == 0)
    if scenario == "one_shot":  # speedup: the sped-up model computes what the masked model computes
        net.eval()
        expected = net(dummy)
        de_plugin_nni.speedup(copy.deepcopy(net), dummy, {n[len(prefix):]: v for n, v in masks.items()})
        torch.testing.assert_close(net(dummy), expected)


@pytest.mark.parametrize("model_type", ["pytorch", "lightning"])
def test_dependency_groups(data, model_type):
    """test_pruner.py runs every norm pruner on ``auto_set_denpendency_group_ids(config_list)``: the
    built-in L1NormPruner aligns the coupled convs' channels; de_layerwise (single weights) refuses
    the key with the reason instead of ignoring it."""
    from nni.compression.pruning import L1NormPruner

    model, evaluator, _, dummy = create(model_type, data)
    p = "model." if model_type == "lightning" else ""
    # what auto_set_denpendency_group_ids returns for this model (its torch.jit graph utilities need
    # tensorboard, which is not installed here): the summed convs share a dependency group
    cfg = [{"op_types": ["Linear"], "exclude_op_names": [f"{p}fc2"], "sparse_ratio": 0.75},
           {"op_names": [f"{p}conv1"], "sparse_ratio": 0.75},
           {"op_names": [f"{p}conv2", f"{p}conv3"], "sparse_ratio": 0.75, "dependency_group_id": 1}]
    _, masks = L1NormPruner(copy.deepcopy(model), cfg).compress()
    rows = [masks[f"{p}conv{i}"]["weight"].sum([1, 2, 3]).bool() for i in (2, 3)]
    assert torch.equal(rows[0], rows[1])  # the summed convs keep the same channels
    with pytest.raises(ValueError, match="de_layerwise does not support dependency_group_id"):
        de_plugin_nni.DELayerwisePruner(model, cfg, evaluator, **DE)
