"""The pruned model saved whole and loaded back: outputs bit-for-bit equal to the
pruned model, into a fresh model too, for the core, NNI and INC paths; masks-only says what it is."""
import copy
import os
import stat

import pytest
import torch

import de_plugin
from conftest import MLP, nni_evaluator

FAST = {"population": 4, "generations": 1, "rounds": 2, "finetune_epochs": 1, "scan_levels": [0.5]}


def fresh_mlp():
    torch.manual_seed(123)  # other weights than the pruned model's
    return MLP()


def test_core_result_round_trip_into_a_fresh_model(mlp, evaluate, finetune, digits, tmp_path):
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.9, progress=False,
                        **FAST)
    path = tmp_path / "pruned.pt"
    r.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    loaded = de_plugin.load(path, fresh_mlp())
    x = digits.x_test
    assert torch.equal(loaded(x), r.model(x))  # bit for bit
    assert torch.load(path, weights_only=True)["format"] == "de_plugin.pruned/2"  # safe to read


def test_masks_only_is_explicit_and_warns(mlp, evaluate, finetune, tmp_path):
    r = de_plugin.prune(mlp, "global_magnitude", finetune=finetune, sparsity=0.8, progress=False, rounds=1)
    r.save(tmp_path / "m.pt", masks_only=True)
    with pytest.warns(UserWarning, match="masks only"):
        de_plugin.load(tmp_path / "m.pt", fresh_mlp())


def test_random_coarse_round_trip_keeps_bn_statistics(digits, tmp_path):
    from de_plugin.demo.models import SmallResNet
    from de_plugin.demo.training import make_evaluate, make_finetune, train

    x, y = digits.x_train.reshape(-1, 1, 8, 8), digits.y_train
    xv = digits.x_val.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = train(SmallResNet(widths=(8, 16, 16)), x, y, epochs=1, lr=3e-3, batch_size=64)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    r = de_plugin.prune(model, "random_coarse", evaluate=make_evaluate(xv, digits.y_val), train_data=batches,
                        finetune=make_finetune(x, y, lr=1e-3), candidates=2, bn_batches=2, progress=False)
    r.save(tmp_path / "c.pt")
    torch.manual_seed(9)
    loaded = de_plugin.load(tmp_path / "c.pt", SmallResNet(widths=(8, 16, 16))).eval()
    assert torch.equal(loaded(xv), r.model.eval()(xv))


def test_nni_model_round_trip(mlp, digits, evaluate, tmp_path):
    pytest.importorskip("nni")
    import de_plugin_nni

    p = de_plugin_nni.create_pruner("de_layerwise", mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.8}],
                                    nni_evaluator(mlp, digits, evaluate), **FAST, progress=False)
    _, masks = p.compress()
    p.unwrap_model()
    de_plugin.save_model(tmp_path / "nni.pt", mlp, {f"{k}.weight": v["weight"].bool() for k, v in masks.items()})
    loaded = de_plugin.load(tmp_path / "nni.pt", fresh_mlp())
    assert torch.equal(loaded(digits.x_test), mlp(digits.x_test))


def test_inc_model_round_trip(mlp, evaluate, digits, tmp_path):
    pytest.importorskip("neural_compressor")
    from neural_compressor.training import WeightPruningConfig, prepare_compression

    import de_plugin_inc  # noqa: F401
    from test_inc import train_with

    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                "de_options": {"population": 4, "generations": 1}}], target_sparsity=0.7,
                              pattern="1x1", start_step=0, end_step=0)
    train_with(prepare_compression(mlp, cfg), mlp, digits)
    de_plugin.save_model(tmp_path / "inc.pt", mlp)  # masks taken from the zeros
    saved = torch.load(tmp_path / "inc.pt", weights_only=True)
    assert float((~saved["masks"]["fc1.weight"]).float().mean()) > 0.3
    loaded = de_plugin.load(tmp_path / "inc.pt", fresh_mlp())
    assert torch.equal(loaded(digits.x_test), mlp(digits.x_test))


def test_wrong_architecture_refused_untouched(mlp, tmp_path):
    r = de_plugin.prune(mlp, "uniform_magnitude", sparsity=0.5, progress=False, rounds=1, finetune_epochs=0)
    r.save(tmp_path / "u.pt")
    other = torch.nn.Sequential(torch.nn.Linear(64, 64))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="do not fit this model"):
        de_plugin.load(tmp_path / "u.pt", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_onnx_export_runs_in_onnxruntime(mlp, evaluate, finetune, digits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.9, progress=False,
                        **FAST)
    out = r.export_onnx(tmp_path / "m.onnx", digits.x_test[:2])
    assert out["bytes"] > 0
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = digits.x_test[:100]
    got = sess.run(None, {"input0": x.numpy()})[0]
    assert float(abs(torch.from_numpy(got) - r.model(x).detach()).max()) <= 1e-4
