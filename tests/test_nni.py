"""Conformance of the NNI adapter, modelled on NNI's own pruner tests: a tiny model on real data
(digits), exact sparsity asserts, scheduling, QAT fusion, speedup equivalence and bad input."""
import copy

import nni
import pytest
import torch
import torch.nn.functional as F
from nni.compression.pruning import AGPPruner, L1NormPruner, LevelPruner
from nni.compression.quantization import QATQuantizer
from torch import nn

import de_plugin
import de_plugin_nni
from conftest import nni_evaluator, same_state, state_of

DE = {"population": 6, "generations": 2, "rounds": 2, "finetune_epochs": 1, "scan_levels": [0.5, 0.8],
      "progress": False}


@pytest.fixture
def evaluator_for(digits, evaluate):
    return lambda model: nni_evaluator(model, digits, evaluate)


def sparsity(masks, names=None):
    sel = [v["weight"] for k, v in masks.items() if names is None or k in names]
    return 1 - sum(m.sum().item() for m in sel) / sum(m.numel() for m in sel)


def test_budget_bounds_binary_and_zero(mlp, evaluator_for):
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.8, "max_sparse_ratio": 0.9, "min_sparse_ratio": 0.2}]
    p = de_plugin_nni.create_pruner("de_layerwise", mlp, cfg, evaluator_for(mlp), **DE)
    model, masks = p.compress()
    assert model is mlp
    assert sparsity(masks) == pytest.approx(0.8, abs=1e-3)
    for name, m in masks.items():
        w = m["weight"]
        assert set(torch.unique(w).tolist()) <= {0.0, 1.0}
        assert 0.2 - 1e-3 <= 1 - w.mean().item() <= 0.9 + 1e-3
    p.unwrap_model()
    for name, m in masks.items():
        weight = mlp.get_submodule(name).weight
        assert torch.all(weight[m["weight"] == 0] == 0)
        assert weight[m["weight"] == 1].abs().sum() > 0


def test_each_entry_is_its_own_budget(mlp, evaluator_for):
    cfg = [{"op_names": ["fc1"], "sparse_ratio": 0.9}, {"op_names": ["fc2", "out"], "sparse_ratio": 0.5}]
    p = de_plugin_nni.DELayerwisePruner(mlp, cfg, evaluator_for(mlp), **DE)
    _, masks = p.compress()
    assert sparsity(masks, ["fc1"]) == pytest.approx(0.9, abs=1e-3)
    assert sparsity(masks, ["fc2", "out"]) == pytest.approx(0.5, abs=1e-3)
    # the searched allocation, exported as a plain config_list, reproduces it with NNI's LevelPruner
    exported = de_plugin_nni.export_config_list(masks)
    p.unwrap_model()
    fresh = copy.deepcopy(mlp)
    _, level_masks = LevelPruner(fresh, exported).compress()
    for name in masks:
        assert torch.equal(level_masks[name]["weight"].sum(), masks[name]["weight"].sum()), name  # same count


def test_agp_schedule_followed(mlp, evaluator_for):
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.8}]
    inner = de_plugin_nni.DELayerwisePruner(mlp, cfg, evaluator_for(mlp), **DE)
    seen, original = [], inner.generate_masks

    def spy():
        out = original()
        seen.append(sparsity(out))
        return out

    inner.generate_masks = spy
    agp = AGPPruner(inner, interval_steps=4, total_times=3)
    _, masks = agp.compress(max_steps=12, max_epochs=None)
    expected = [(1 - (1 - t / 3) ** 3) * 0.8 for t in (1, 2, 3)]  # AGP's cubic schedule
    assert seen == pytest.approx(expected, abs=2e-3)
    assert sparsity(masks) == pytest.approx(0.8, abs=1e-3)


def test_fused_with_qat_keeps_pruned_int_weights_zero(mlp, evaluator_for):
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.7}]
    p = de_plugin_nni.DELayerwisePruner(mlp, cfg, evaluator_for(mlp), **DE)
    qcfg = [{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int8", "quant_scheme": "symmetric"}]
    q = QATQuantizer.from_compressor(p, qcfg, quant_start_step=2)
    model, calib = q.compress(max_steps=8, max_epochs=None)
    masks = p.get_masks()
    assert sparsity(masks) == pytest.approx(0.7, abs=1e-3)
    for name, m in masks.items():  # the weight the fused wrapper computes with: masked, then fake-quantized
        space = q._target_spaces[name]["weight"]
        with torch.no_grad():
            deq = q._module_wrappers[name].patch_helper("weight", space.target)
        scale, zp = calib[name]["weight"]["scale"], calib[name]["weight"]["zero_point"]
        ints = torch.round(deq / scale) + zp
        assert torch.all(ints[m["weight"] == 0] == zp), "pruned weights must be the zero point in int8"
        assert (ints[m["weight"] == 1] != zp).any()
    q.unwrap_model()


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        if x.mean() > -100:  # a data-dependent branch torch.fx cannot trace
            y = y * 1.0
        return torch.relu(x + y)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.block = Block(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.block(x).mean((2, 3)))


def test_auto_speedup_falls_back_when_modelspeedup_computes_something_else(digits, caplog):
    """NNI 3.0's ModelSpeedup on element-wise masks removes nothing and leaves the values LevelPruner keeps
    behind its masks: it runs, but its model is not the masked one. engine="auto" must see that and slice."""
    import logging

    from de_plugin_nni.tracing import masked_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    pruner = LevelPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.75}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    x = digits.x_val[:8].reshape(8, -1)
    assert not torch.all(model[0].weight[masks["0"]["weight"] == 0] == 0)  # values kept behind the mask
    expected = masked_copy(model, masks, x)(x)
    nni_only = de_plugin_nni.speedup(copy.deepcopy(model), x, masks, engine="nni")
    assert (nni_only(x) - expected).abs().max() > 1e-3  # the defect the check exists for
    with caplog.at_level(logging.WARNING, logger="de_plugin_nni"):
        de_plugin_nni.speedup(model, x, masks)
    assert "differs from the masked model" in caplog.text
    torch.testing.assert_close(model(x), expected)


def test_speedup_output_equal_on_residual_bn_branch_model(digits):
    torch.manual_seed(0)
    model = ResNetish()
    with torch.no_grad():  # non-trivial BN statistics and affine terms
        for bn in (model.bn, model.block.b1, model.block.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    model.eval()
    cfg = [{"op_names": ["stem", "block.c2"], "sparse_ratio": 0.5, "dependency_group_id": 1},
           {"op_names": ["block.c1"], "sparse_ratio": 0.5}]
    pruner = L1NormPruner(model, cfg)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert torch.equal(masks["stem"]["weight"].flatten(1)[:, 0], masks["block.c2"]["weight"].flatten(1)[:, 0])
    # the masked reference: removed channels lose their conv and BatchNorm affine outputs
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for conv, bn in (("stem", "bn"), ("block.c2", "block.b2"), ("block.c1", "block.b1")):
            keep = masks[conv]["weight"].flatten(1)[:, 0]
            ref.get_submodule(conv).weight.mul_(masks[conv]["weight"])
            ref.get_submodule(conv).bias.mul_(keep)
            b = ref.get_submodule(bn)
            b.weight.mul_(keep)
            b.bias.mul_(keep)
    x = digits.x_val[:16]
    expected = ref(x)
    model.train()
    de_plugin_nni.speedup(model, digits.x_val[:2], masks)
    assert not model.training
    assert model.stem.out_channels == 8 and model.block.c1.out_channels == 8 and model.fc.in_features == 8
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_names_create_builtins_and_schedulers(mlp, evaluator_for):
    assert {"de_layerwise", "random_coarse", "de_channel", "level", "l1norm", "l2norm", "fpgm", "slim", "taylor", "movement", "linear",
            "agp", "lamp", "erk", "global_magnitude", "uniform_magnitude"} == set(de_plugin_nni.list_pruners())
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.5}]
    # a core baseline from the registry, run by NNI like de_layerwise: the same allocation as the core's
    m = copy.deepcopy(mlp)
    _, masks = de_plugin_nni.create_pruner("lamp", m, cfg, evaluator_for(m), rounds=1, finetune_epochs=0).compress()
    core = de_plugin.prune(copy.deepcopy(mlp), "lamp", sparsity=0.5, rounds=1, finetune_epochs=0, progress=False)
    assert {n: int(v["weight"].sum()) for n, v in masks.items()} == \
        {n.rsplit(".", 1)[0]: int(v.sum()) for n, v in core.masks.items()}
    for name in ["level", "l1norm", "l2norm", "fpgm"]:
        p = de_plugin_nni.create_pruner(name, copy.deepcopy(mlp), cfg)
        _, masks = p.compress()
        assert sparsity(masks) == pytest.approx(0.5, abs=0.02), name
    m = copy.deepcopy(mlp)
    agp = de_plugin_nni.create_pruner("agp", m, cfg, evaluator_for(m), pruner="level", interval_steps=2, total_times=2)
    _, masks = agp.compress(max_steps=4, max_epochs=None)
    assert sparsity(masks) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    "name,cfg,kwargs,exc,match",
    [
        ("de_layrwise", [{"op_types": ["Linear"], "sparse_ratio": 0.5}], {}, ValueError, "Did you mean 'de_layerwise'"),
        ("de_layerwise", [{"op_types": ["Linear"], "sparse_ratio": 0.5, "pruner": "de_layerwise"}], {}, ValueError,
         "not valid for NNI.*pruner"),
        ("de_layerwise", [{"op_types": ["Linear"], "sparse_ratio": 1.2}], {}, ValueError, "sparse_ratio"),
        ("de_layerwise", [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], {}, ValueError, "selects no"),
        ("de_layerwise", [{"op_types": ["Linear"], "sparse_ratio": 0.5}], {"populaton": 3}, ValueError, "did you mean"),
        ("agp", [{"op_types": ["Linear"], "sparse_ratio": 0.5}], {"interval_steps": 2}, ValueError, "total_times"),
    ],
)
def test_bad_input_clear_errors_model_untouched(mlp, evaluator_for, name, cfg, kwargs, exc, match):
    before = state_of(mlp)
    with pytest.raises(exc, match=match):
        de_plugin_nni.create_pruner(name, mlp, cfg, evaluator_for(mlp), **kwargs)
    assert same_state(before, state_of(mlp))
    assert not any("_nni_wrapper" in n for n, _ in mlp.named_modules())


def test_evaluator_must_be_nni(mlp, evaluate):
    with pytest.raises(TypeError, match="NNI Evaluator"):
        de_plugin_nni.DELayerwisePruner(mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], evaluate)


def test_config_dict_prune_then_fresh_qat_keeps_zeros(mlp, evaluator_for):

    cfg = {
        "pruner": "de_layerwise",
        "options": {k: v for k, v in DE.items()},
        "config_list": [{"op_types": ["Linear"], "sparse_ratio": 0.6}],
        "quantizer": {"name": "qat", "steps": 20, "config_list": [
            {"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int8", "quant_scheme": "symmetric"}]},
    }
    report = de_plugin_nni.run_config(cfg, model=mlp, evaluator=evaluator_for(mlp))
    assert report["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert report["storage"]["nonzero_int8"] <= 0.4 * report["storage"]["weights"] + 1
    assert report["storage"]["sparse_int8_bytes"] < report["storage"]["dense_int8_bytes"]
    assert report["val_accuracy_quantized"] > 0.8


def test_config_structured_pruner_with_speedup(evaluator_for, digits):
    torch.manual_seed(0)
    model = ResNetish()
    cfg = {"pruner": "l1norm", "config_list": [{"op_names": ["block.c1"], "sparse_ratio": 0.5}], "speedup": True}
    report = de_plugin_nni.run_config(cfg, model=model, evaluator=evaluator_for(model))
    assert report["speedup"]["params_after"] < report["speedup"]["params_before"]
    assert model.block.c1.out_channels == 8 and model.block.c2.in_channels == 8


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"pruner": "de_layerwise", "config_list": [], "quantiser": {}}, "unknown key 'quantiser'"),
        ({"pruner": "de_layerwise", "config_list": [{"op_types": ["Linear"], "sparse_ratio": 0.5}],
          "quantizer": {"name": "int4", "config_list": []}}, "unknown quantizer 'int4'"),
        ({"pruner": "nope", "config_list": [{"op_types": ["Linear"], "sparse_ratio": 0.5}]}, "Available NNI pruners"),
        # a core baseline's options are its own (LAMP has no population), checked before any work
        ({"pruner": "lamp", "options": {"population": 8}, "config_list": [{"op_types": ["Linear"], "sparse_ratio": 0.5}]},
         "lamp.*population"),
    ],
)
def test_config_errors(mlp, evaluator_for, cfg, match):
    before = state_of(mlp)
    with pytest.raises(ValueError, match=match):
        de_plugin_nni.run_config(cfg, model=mlp, evaluator=evaluator_for(mlp))
    assert same_state(before, state_of(mlp))


def test_cli_runs_yaml_config_on_fashion_mnist_subset(tmp_path, monkeypatch, capsys):
    import json

    from de_plugin import cli
    from de_plugin.demo import training as demo_training

    monkeypatch.setattr(demo_training, "CACHE", tmp_path / "cache")
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "pruner: de_layerwise\n"
        "options: {rounds: 1, finetune_epochs: 1, population: 6, generations: 2, scan_levels: [0.5], progress: false}\n"
        "config_list:\n  - {op_types: [Linear], sparse_ratio: 0.8}\n"
        "model: lenet300\n"
        "train: {epochs: 1, train_limit: 3000, val_size: 500}\n"
    )
    assert cli.main(["nni", str(path), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert abs(res["sparsity"] - 0.8) < 1e-3 and "test_accuracy_pruned" in res
    assert "fc1" in capsys.readouterr().out


def lightning_evaluator(digits):
    import pytorch_lightning as pl
    from nni.compression import LightningEvaluator
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import MLP

    class LitMLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            self.steps = getattr(self, "steps", 0) + 1
            return F.cross_entropy(self(batch[0]), batch[1])

        def test_step(self, batch, _):
            self.log("default", (self(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return nni.trace(torch.optim.Adam)(self.parameters(), lr=1e-3)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=64, shuffle=True)

        def test_dataloader(self):
            return DataLoader(TensorDataset(digits.x_val, digits.y_val), batch_size=300)

    trainer = nni.trace(pl.Trainer)(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)
    return LitMLP(), LightningEvaluator(trainer, nni.trace(Data)(), dummy_input=digits.x_val[:2])


def test_lightning_evaluator_trains_and_scores(digits, _trained):
    model, evaluator = lightning_evaluator(digits)
    model.net.load_state_dict(_trained.state_dict())
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.7}]
    p = de_plugin_nni.create_pruner("de_layerwise", model, cfg, evaluator,
                                    **{**DE, "population": 4, "generations": 1, "rounds": 1, "sensitivity_scan": False})
    _, masks = p.compress()
    assert sparsity(masks) == pytest.approx(0.7, abs=1e-3)
    assert p.results[0].nfev > 0 and p.results[0].accuracy > 0.5
    p.unwrap_model()
    evaluator.bind_model(model)
    before, model.steps = copy.deepcopy(model.net.state_dict()), 0
    evaluator.train(max_steps=3)  # the step-limited path NNI's schedulers use (patched for lightning 2.x)
    evaluator.unbind_model()
    assert model.steps == 3, "the step limit must reach the fit loop"
    assert any(not torch.equal(before[k], v) for k, v in model.net.state_dict().items()), "training ran"


def _bn_stats(model):
    with torch.no_grad():  # non-trivial BN statistics and affine terms
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def test_random_coarse_through_nni_speedup_equals_masked_model(evaluator_for, digits):
    from de_plugin.demo.models import SmallResNet

    from de_plugin.demo.training import train

    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16, 16))
    train(model, digits.x_train, digits.y_train, epochs=3, lr=3e-3, batch_size=64)  # trained weights and BN
    batches = [(digits.x_train[i:i + 64], digits.y_train[i:i + 64]) for i in range(0, 256, 64)]
    pruner = de_plugin_nni.create_pruner(
        "random_coarse", model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], evaluator_for(model),
        candidates=3, train_data=batches, bn_batches=2, finetune_epochs=1, kernel_ratio=0.2, progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    rows = lambda n: masks[n]["weight"].flatten(1).any(1)  # noqa: E731
    # NNI's dependency groups: residual-coupled convs lose the same channels
    assert torch.equal(rows("layer1.conv2"), rows("stem.0"))
    assert torch.equal(rows("layer3.conv2"), rows("layer3.shortcut.0"))
    assert all(int(rows(n).sum()) == masks[n]["weight"].shape[0] // 2 for n in masks)
    assert pruner.result["accuracy"] > 0.2 and 0.1 < pruner.result["macs_kept"] < 0.5
    model.eval()
    x = digits.x_val[:16]
    expected = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    de_plugin_nni.speedup(model, digits.x_val[:2], masks)
    assert model.stem[0].out_channels == 4 and model.layer3.conv1.out_channels == 8 and model.fc.in_features == 8
    assert sum(p.numel() for p in model.parameters()) < params_before / 2
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # kernel masks stay masks: the smaller conv still has its removed kernels at zero
    dead = int((model.layer3.conv1.weight.flatten(2).abs().sum(2) == 0).sum())
    assert dead == round(0.2 * 8 * 8)  # a fifth of the 8 x 8 kernels alive after feature-map pruning


def test_random_coarse_nni_adaptive_bn_from_the_evaluator_without_train_data(evaluator_for):
    from de_plugin.demo.models import SmallResNet
    from de_plugin_nni.coarse import training_inputs

    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16, 16))
    _bn_stats(model)
    ev = evaluator_for(model)
    ev._init_optimizer_helpers(model)  # what NNI's compressors do with an evaluator before binding it
    ev.bind_model(model)
    before = state_of(model)
    inputs = training_inputs(ev, model, 3)
    ev.unbind_model()
    # three of the training function's own batches; no weight moved, BN statistics put back
    assert len(inputs) == 3 and inputs[0].shape[0] == 64
    assert same_state(before, state_of(model))
    pruner = de_plugin_nni.create_pruner("random_coarse", model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
                                         evaluator_for(model),
                                         candidates=2, bn_batches=2, finetune_epochs=0, progress=False)
    pruner.compress()
    assert pruner.result["adaptive_bn_batches"] == 2


def test_random_coarse_nni_bad_input(evaluator_for):
    from de_plugin.demo.models import SmallResNet

    model = SmallResNet(widths=(8, 16, 16))
    before = state_of(model)
    ev = evaluator_for(model)
    with pytest.raises(ValueError, match="sparse_ratio"):
        de_plugin_nni.create_pruner("random_coarse", model, [{"op_types": ["Conv2d"], "sparse_ratio": 1.0}], ev)
    with pytest.raises(ValueError, match="config_list's sparse_ratio"):
        de_plugin_nni.create_pruner("random_coarse", model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], ev,
                                    feature_map_ratio=0.3)
    with pytest.raises(ValueError, match="selects no Conv2d"):
        de_plugin_nni.create_pruner("random_coarse", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], ev)
    with pytest.raises(ValueError, match="candidates"):
        de_plugin_nni.create_pruner("random_coarse", model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], ev,
                                    candidates=0)
    assert same_state(before, state_of(model))


def test_multi_entry_masks_hold_to_the_end(mlp, evaluator_for):
    """Later entries' fine-tuning must not regrow what earlier entries pruned (every entry ends at zero)."""
    cfg = [{"op_names": ["fc1"], "sparse_ratio": 0.9}, {"op_names": ["fc2"], "sparse_ratio": 0.7},
           {"op_names": ["out"], "sparse_ratio": 0.5}]
    p = de_plugin_nni.DELayerwisePruner(mlp, cfg, evaluator_for(mlp), **{**DE, "finetune_epochs": 2})
    _, masks = p.compress()
    p.unwrap_model()
    for name, ratio in (("fc1", 0.9), ("fc2", 0.7), ("out", 0.5)):
        w = mlp.get_submodule(name).weight
        assert float((w == 0).float().mean()) == pytest.approx(ratio, abs=2e-3), name
        assert torch.all(w[masks[name]["weight"] == 0] == 0), name


def test_evaluation_inside_a_schedule_restores_train_mode(mlp, digits, evaluate):
    """An evaluating_func that leaves the model in eval mode must not switch the schedule's training off."""
    from nni.compression.pruning import LinearPruner

    from conftest import nni_evaluator

    def careless(model):
        model.eval()  # and never back
        return evaluate(model)

    modes = []
    inner = de_plugin_nni.DELayerwisePruner(mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.6}],
                                            nni_evaluator(mlp, digits, careless), **DE)
    hook = mlp.register_forward_pre_hook(lambda m, a: modes.append(m.training) if torch.is_grad_enabled() else None)
    LinearPruner(inner, interval_steps=3, total_times=2).compress(max_steps=9, max_epochs=None)
    hook.remove()
    assert len(modes) >= 9 and all(modes), f"{modes.count(False)} training forwards ran in eval mode"


def test_agp_with_lightning_evaluator(digits, _trained):
    """The schedule's re-allocation evaluates inside trainer.fit; the fit's trainer must stay attached."""
    model, evaluator = lightning_evaluator(digits)
    model.net.load_state_dict(_trained.state_dict())
    inner = de_plugin_nni.create_pruner("de_layerwise", model, [{"op_types": ["Linear"], "sparse_ratio": 0.6}],
                                        evaluator, **{**DE, "population": 4, "generations": 1, "sensitivity_scan": False})
    _, masks = AGPPruner(inner, interval_steps=2, total_times=2).compress(max_steps=4, max_epochs=None)
    assert sparsity(masks) == pytest.approx(0.6, abs=1e-3)


def test_lsq_fusion_with_lightning_evaluator(digits, _trained):
    """Fused with LSQ under Lightning: the up-front evaluation must not turn the quantizer's
    scale / zero point into inference tensors (Lightning tests under torch.inference_mode)."""
    from nni.compression.quantization import LsqQuantizer

    model, evaluator = lightning_evaluator(digits)
    model.net.load_state_dict(_trained.state_dict())
    p = de_plugin_nni.create_pruner("de_layerwise", model, [{"op_types": ["Linear"], "sparse_ratio": 0.6}],
                                    evaluator, **{**DE, "population": 4, "generations": 1, "sensitivity_scan": False})
    qcfg = [{"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int8", "quant_scheme": "symmetric"}]
    q = LsqQuantizer.from_compressor(p, qcfg)
    q.compress(max_steps=4, max_epochs=None)
    assert sparsity(p.get_masks()) == pytest.approx(0.6, abs=1e-3)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> 3x3 depthwise -> 1x1 project, residual."""

    def __init__(self, c, e):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, c * e, 1, bias=False), nn.BatchNorm2d(c * e)
        self.dw, self.bn2 = nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e, bias=False), nn.BatchNorm2d(c * e)
        self.project, self.bn3 = nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        return x + self.bn3(self.project(F.relu6(self.bn2(self.dw(y)))))


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.b1, self.b2 = InvertedResidual(8, 4), InvertedResidual(8, 4)
        self.aux = nn.Conv2d(8, 4, 1)  # an auxiliary head, called in training only (as GoogLeNet's)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.b2(self.b1(torch.relu(self.stem(x))))
        if self.training:
            x = x + 0 * self.aux(x).mean()
        return self.fc(x.mean((2, 3)))


def test_random_coarse_speedup_removes_depthwise_channels_exactly(digits, evaluate):
    """The sped-up MobileNetV2-style model has exactly the parameter count the masks predict, and
    a mask for a conv the eval graph never calls does not break the speedup."""
    from conftest import nni_evaluator
    from de_plugin.demo.training import make_evaluate

    class Images:
        x_train, y_train = digits.x_train.reshape(-1, 1, 8, 8), digits.y_train
        x_val, y_val = digits.x_val.reshape(-1, 1, 8, 8), digits.y_val

    torch.manual_seed(0)
    model = MobileNetish().eval()
    ev = make_evaluate(Images.x_val, Images.y_val)
    p = de_plugin_nni.create_pruner("random_coarse", model, [{"op_names": ["b1.expand", "b2.expand"], "sparse_ratio": 0.5}],
                                    nni_evaluator(model, Images, ev), candidates=2, adaptive_bn=False,
                                    finetune_epochs=0, progress=False)
    _, masks = p.compress()
    p.unwrap_model()
    assert {"b1.dw", "b2.dw"} <= set(masks)  # the depthwise convs get the expand convs' rows
    masks["aux"] = {"weight": torch.ones_like(model.aux.weight)}
    model.eval()
    x = Images.x_val[:16]
    expected = model(x)
    small = copy.deepcopy(model)
    de_plugin_nni.speedup(small, x[:2], masks)
    assert small.b1.dw.out_channels == 16 and small.b1.project.in_channels == 16
    assert sum(q.numel() for q in small.parameters()) == p.result["params"]
    torch.testing.assert_close(small(x), expected, atol=1e-5, rtol=1e-5)


def test_random_coarse_speedup_of_mobilenetv2_has_the_predicted_parameter_count(digits):
    """The whole MobileNetV2 (17 inverted residuals, depthwise convs, residual adds): after NNI's
    speedup of random_coarse's masks the model has exactly the parameters the masks predict."""
    from conftest import nni_evaluator
    from de_plugin.demo.models import create_model
    from de_plugin.demo.training import make_evaluate

    class Images:
        x_train, y_train = digits.x_train.reshape(-1, 1, 8, 8), digits.y_train
        x_val, y_val = digits.x_val.reshape(-1, 1, 8, 8), digits.y_val

    torch.manual_seed(0)
    model = create_model("mobilenetv2", in_channels=1).eval()
    ev = make_evaluate(Images.x_val, Images.y_val)
    p = de_plugin_nni.create_pruner("random_coarse", model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
                                    nni_evaluator(model, Images, ev), candidates=2, adaptive_bn=False,
                                    finetune_epochs=0, progress=False)
    _, masks = p.compress()
    p.unwrap_model()
    model.eval()
    x = Images.x_val[:8]
    expected = model(x)
    small = copy.deepcopy(model)
    de_plugin_nni.speedup(small, x[:2], masks)
    assert sum(q.numel() for q in small.parameters()) == p.result["params"] < sum(q.numel() for q in model.parameters())
    torch.testing.assert_close(small(x), expected, atol=1e-4, rtol=1e-4)


def test_grouped_search_on_a_58_layer_resnet(digits, evaluator_for):
    """A deep model through NNI: groups='stage' searches 5 values (+ offsets) for 58 layers, exact budget."""
    from de_plugin.demo.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet56", in_channels=1, width=0.25)  # fully convolutional: runs on 8x8 digits
    cfg = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.7}]
    p = de_plugin_nni.create_pruner("de_layerwise", model, cfg, evaluator_for(model),
                                    **{**DE, "population": 8, "generations": 1, "rounds": 1, "groups": "stage",
                                       "adaptation": "jde"}, train_data=[digits.x_train[:64], digits.x_train[64:128]])
    _, masks = p.compress()
    assert len(masks) == 58
    assert sparsity(masks) == pytest.approx(0.7, abs=1e-3)
    assert set(p.results[0].history[0]["sensitivity_scan"]) == {"stem", "layer1", "layer2", "layer3", "fc"}
    p.unwrap_model()
    assert len(p.train_data) == 2  # adaptive BN's batches (BN model + train_data: on by default)


def test_bad_train_data_is_refused_before_any_work(mlp, evaluator_for):
    with pytest.raises((TypeError, ValueError), match="train_data"):
        de_plugin_nni.create_pruner("de_layerwise", mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.5}],
                                    evaluator_for(mlp), train_data=42)


def test_de_channel_through_nni_meets_the_macs_budget_and_speeds_up(evaluator_for, digits):
    from de_plugin.channels.coarse import count_macs
    from de_plugin.demo.models import SmallResNet
    from de_plugin.demo.training import train

    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16, 16))
    train(model, digits.x_train, digits.y_train, epochs=3, lr=3e-3, batch_size=64)
    dense_macs = count_macs(model, digits.x_val[:2])["macs_dense"]
    batches = [(digits.x_train[i:i + 64], digits.y_train[i:i + 64]) for i in range(0, 256, 64)]
    pruner = de_plugin_nni.create_pruner(
        "de_channel", model, [{"op_types": ["Conv2d"]}], evaluator_for(model), macs=0.5, rounds=1, generations=2,
        population=6, train_data=batches, bn_batches=2, finetune_epochs=1, progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert 0.4 < pruner.result["macs_kept"] <= 0.5
    rows = lambda n: masks[n]["weight"].flatten(1).any(1)  # noqa: E731
    assert torch.equal(rows("layer1.conv2"), rows("stem.0"))  # residual-coupled convs lose the same channels
    model.eval()
    x = digits.x_val[:16]
    expected = model(x)
    de_plugin_nni.speedup(model, digits.x_val[:2], masks)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert count_macs(model, digits.x_val[:2])["macs_dense"] == pruner.result["macs"] <= 0.5 * dense_macs
    assert sum(p.numel() for p in model.parameters()) == pruner.result["params"]


def test_de_channel_nni_bad_input(evaluator_for):
    from de_plugin.demo.models import SmallResNet

    model = SmallResNet(widths=(8, 16, 16))
    ev = evaluator_for(model)
    before = state_of(model)
    with pytest.raises(ValueError, match="macs=0.5"):  # a per-layer ratio is what it searches
        de_plugin_nni.create_pruner("de_channel", model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], ev, macs=0.5)
    with pytest.raises(ValueError, match="exactly one budget"):
        de_plugin_nni.create_pruner("de_channel", model, [{"op_types": ["Conv2d"]}], ev)
    with pytest.raises(ValueError, match="selects no Conv2d"):
        de_plugin_nni.create_pruner("de_channel", model, [{"op_types": ["Linear"]}], ev, macs=0.5)
    assert same_state(before, state_of(model))


def test_options_are_validated_once_from_config_to_core(mlp, evaluator_for, monkeypatch):
    """A config's pruner options are validated once (before any work) and that object travels to the core
    pruner: no dump and re-validation on the way. Counted where pydantic builds an options object."""
    from de_plugin.weights.layerwise import LayerwiseOptions

    built, init = [], LayerwiseOptions.__init__

    def counting(self, **data):
        built.append(sorted(data))
        init(self, **data)

    monkeypatch.setattr(LayerwiseOptions, "__init__", counting)
    cfg = {"pruner": "de_layerwise", "options": {k: v for k, v in DE.items()},
           "config_list": [{"op_types": ["Linear"], "sparse_ratio": 0.6, "max_sparse_ratio": 0.9}]}
    report = de_plugin_nni.run_config(cfg, model=mlp, evaluator=evaluator_for(mlp))
    assert report["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len(built) == 1, built
    assert max(1 - r["kept"] / r["params"] for r in report["layers"]) <= 0.9 + 1e-3  # the entry's bound reached it


def test_core_prune_takes_a_created_pruner_and_refuses_options_twice(mlp, evaluate):
    p = de_plugin.create_pruner("lamp")
    r = de_plugin.prune(mlp, p, evaluate=evaluate, sparsity=0.5, progress=False)
    assert r.pruner == "lamp" and r.sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(TypeError, match="create_pruner"):
        de_plugin.prune(mlp, p, evaluate=evaluate, sparsity=0.5, rounds=2)
    from de_plugin.weights.layerwise import LayerwiseOptions
    with pytest.raises(TypeError, match="not both"):
        de_plugin.create_pruner("de_layerwise", LayerwiseOptions(), rounds=2)
    with pytest.raises(TypeError, match="must be LayerwiseOptions"):
        de_plugin.create_pruner("de_layerwise", p.options)
