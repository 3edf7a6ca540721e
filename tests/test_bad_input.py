"""Bad input found by held-out checks: each is a clear error, raised before any work,
naming the argument or key and what to do; the user's model and files are left untouched."""
import json
import os

import pytest
import torch

import de_plugin
from conftest import nni_evaluator, same_state, state_of
from de_plugin import cli
from de_plugin.demo.models import SmallResNet


def counted(evaluate):
    def ev(model):
        ev.calls += 1
        return evaluate(model)

    ev.calls = 0
    return ev


# ------------------------------------------------------------------------------------- core
@pytest.mark.parametrize("content,what", [(os.urandom(4096), "random bytes"), (None, "truncated")])
def test_load_corrupt_masks_file_names_the_file(mlp, evaluate, tmp_path, content, what):
    path = tmp_path / "masks.pt"
    if content is None:  # a real masks file, cut short
        r = de_plugin.prune(mlp, "uniform_magnitude", sparsity=0.5, progress=False, rounds=1, finetune_epochs=0)
        r.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    before = state_of(mlp)
    with pytest.raises(ValueError, match=f"masks file {path} is corrupt or truncated"):
        de_plugin.load(path, mlp)
    assert same_state(before, state_of(mlp))
    with pytest.raises(FileNotFoundError, match="no masks file"):
        de_plugin.load(tmp_path / "missing.pt", mlp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_without_cuda_refused_before_any_evaluation(mlp, evaluate):
    ev = counted(evaluate)
    with pytest.raises(ValueError, match="option 'device'.*no CUDA on this machine"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=ev, sparsity=0.5, device="cuda", progress=False)
    assert ev.calls == 0


def test_val_data_must_be_batches(mlp, digits):
    with pytest.raises(TypeError, match=r"`val_data` must be an iterable of \(inputs, targets\) batches.*one tensor"):
        de_plugin.prune(mlp, "de_layerwise", val_data=digits.x_val, sparsity=0.5, progress=False)
    with pytest.raises(TypeError, match="`val_data`.*batch 0 is tuple of length 3"):
        de_plugin.prune(mlp, "de_layerwise", val_data=[(digits.x_val, digits.y_val, digits.y_val)], sparsity=0.5)


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return SmallResNet(widths=(8, 16, 16))


def images(digits):
    return digits.x_val.reshape(-1, 1, 8, 8), digits.y_val


def test_random_coarse_ratio_key_matching_no_layer(convnet, digits):
    x, y = images(digits)
    before = state_of(convnet)
    with pytest.raises(ValueError, match=r"`ratios` keys \['block.conv9'\] match no selected Conv2d / Linear layer"):
        de_plugin.prune(convnet, "random_coarse", val_data=[(x, y)], score="accuracy", ratios={"block.conv9": 0.25},
                        candidates=2, adaptive_bn=False, progress=False)
    with pytest.raises(ValueError, match=r"`kernel_ratios` keys \['nope\*'\]"):
        de_plugin.prune(convnet, "random_coarse", val_data=[(x, y)], kernel_ratios={"nope*": 0.2}, candidates=2,
                        adaptive_bn=False, progress=False)
    assert same_state(before, state_of(convnet))


def test_random_coarse_train_data_tensor_refused_first(convnet, digits, evaluate):
    x, y = images(digits)
    ev = counted(lambda m: float((m(x).argmax(1) == y).float().mean()))
    with pytest.raises(TypeError, match="`train_data` must be an iterable of batches.*one tensor of shape"):
        de_plugin.prune(convnet, "random_coarse", evaluate=ev, train_data=x, candidates=2, progress=False)
    assert ev.calls == 0


def test_option_types_are_strict():
    with pytest.raises(ValueError, match="option 'rounds': Input should be a valid integer"):
        de_plugin.create_pruner("de_layerwise", rounds="4")
    assert de_plugin.create_pruner("de_layerwise", mutation=1).options.mutation == 1.0  # int where a float belongs


def test_checkpoint_directory_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        de_plugin.create_pruner("de_layerwise", checkpoint=str(tmp_path))


def test_percent_accuracy_with_fractional_drop_refused(mlp, evaluate, finetune):
    ev = counted(lambda m: 100.0 * evaluate(m))
    before = state_of(mlp)
    with pytest.raises(ValueError, match="return accuracy as a fraction"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=ev, finetune=finetune, max_accuracy_drop=0.01, progress=False)
    assert ev.calls == 1 and same_state(before, state_of(mlp))  # only the reference was measured


def test_cli_bad_options_json(capsys):
    assert cli.main(["run", "--options", '{"rounds": 4,, }']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("de-plugin: error: --options is not valid JSON") and "line 1 column" in err[-1]


# -------------------------------------------------------------------------------------- NNI
@pytest.fixture
def nni_pruner():
    pytest.importorskip("nni")
    import de_plugin_nni

    return de_plugin_nni.create_pruner


@pytest.mark.parametrize("text,suffix,match", [
    ("pruner: de_layerwise\nconfig_list: [\n  - {op_types: [Linear]\n", ".yaml", r"is not valid YAML at line \d+"),
    ('{"pruner": "de_layerwise", "config_list": [}', ".json", r"is not valid JSON at line 1, column \d+"),
])
def test_cli_config_syntax_errors_name_file_and_line(nni_pruner, tmp_path, capsys, text, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    assert cli.main(["nni", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith(f"de-plugin: error: {path}")
    import re

    assert re.search(match, err[-1])


@pytest.mark.parametrize("name", ["de_layerwise", "random_coarse", "level", "l1norm"])
def test_nni_op_names_naming_no_module(nni_pruner, mlp, digits, evaluate, name):
    before = state_of(mlp)
    with pytest.raises(ValueError, match=r"op_names \['fc9'\] name no module of the model; its Conv/Linear modules"):
        nni_pruner(name, mlp, [{"op_names": ["fc9"], "sparse_ratio": 0.5}], nni_evaluator(mlp, digits, evaluate))
    assert same_state(before, state_of(mlp)) and not hasattr(mlp.fc1, "_nni_wrapper")


def test_nni_max_below_min_refused_before_wrapping(nni_pruner, mlp, digits, evaluate):
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "max_sparse_ratio": 0.3, "min_sparse_ratio": 0.4}]
    with pytest.raises(ValueError, match="max_sparse_ratio=0.3 is below min_sparse_ratio=0.4"):
        nni_pruner("de_layerwise", mlp, cfg, nni_evaluator(mlp, digits, evaluate))
    assert not hasattr(mlp.fc1, "_nni_wrapper")


@pytest.mark.parametrize("name", ["level", "l1norm", "l2norm", "fpgm"])
@pytest.mark.parametrize("ratio", [1.2, -0.1])
def test_nni_builtins_get_the_same_config_checks(nni_pruner, mlp, name, ratio):
    with pytest.raises(ValueError, match=r"sparse_ratio=.* must lie in \[0, 1\)"):
        nni_pruner(name, mlp, [{"op_types": ["Linear"], "sparse_ratio": ratio}])


@pytest.mark.parametrize("key,value", [("granularity", "in_channel"), ("dependency_group_id", 1),
                                       ("internal_metric_block", 4)])
def test_nni_settings_de_layerwise_cannot_honour_are_refused(nni_pruner, mlp, digits, evaluate, key, value):
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.5, key: value}]
    with pytest.raises(ValueError, match=f"de_layerwise does not support {key}="):
        nni_pruner("de_layerwise", mlp, cfg, nni_evaluator(mlp, digits, evaluate))


def test_nni_legacy_config_keys_accepted(nni_pruner, mlp, digits, evaluate):
    cfg = [{"op_types": ["Linear"], "sparsity": 0.7}]  # NNI 2.x form, still accepted by NNI 3.0
    p = nni_pruner("de_layerwise", mlp, cfg, nni_evaluator(mlp, digits, evaluate), population=6, generations=1,
                   rounds=1, finetune_epochs=1, scan_levels=[0.5], progress=False)
    _, masks = p.compress()
    kept = sum(m["weight"].sum().item() for m in masks.values())
    total = sum(m["weight"].numel() for m in masks.values())
    assert 1 - kept / total == pytest.approx(0.7, abs=1e-3)


def test_nni_speedup_refuses_masks_that_do_not_fit_before_any_work(nni_pruner, digits):
    """A mask of the wrong shape, or for a module the model lacks, is said plainly before any tracing,
    and the model is left as it was."""
    import de_plugin_nni

    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    before = state_of(model)
    x = digits.x_val[:2].reshape(2, -1)
    with pytest.raises(ValueError, match=r"the mask of 0\.weight has shape \(3, 3\), the tensor \(16, 64\)"):
        de_plugin_nni.speedup(model, x, {"0": {"weight": torch.ones(3, 3)}})
    with pytest.raises(ValueError, match=r"masks name module 'fc1', which the model does not have"):
        de_plugin_nni.speedup(model, x, {"fc1": {"weight": torch.ones(16, 64)}})
    assert same_state(before, state_of(model))


# -------------------------------------------------------------------------------------- INC
@pytest.fixture
def inc():
    pytest.importorskip("neural_compressor")
    from neural_compressor.training import WeightPruningConfig, prepare_compression

    import de_plugin_inc  # noqa: F401 - registers the pruners

    return WeightPruningConfig, prepare_compression


@pytest.mark.parametrize("bad", ["population=4", 8])
def test_inc_de_options_not_a_dict(inc, mlp, evaluate, bad):
    WeightPruningConfig, prepare_compression = inc
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                "de_options": bad}], target_sparsity=0.5, pattern="1x1", start_step=0, end_step=0)
    with pytest.raises(TypeError, match="de_options must be a dict"):
        prepare_compression(mlp, cfg)


def test_inc_random_coarse_entry_matching_nothing(inc, convnet, evaluate):
    WeightPruningConfig, prepare_compression = inc
    cfg = WeightPruningConfig([{"op_names": ["nothing.*"], "pruning_type": "random_coarse", "eval_func": evaluate}],
                              target_sparsity=0.5, pattern="1xchannel", start_step=0, end_step=0)
    with pytest.raises(ValueError, match=r"random_coarse: op_names \['nothing.\*'\] matched no Conv2d layer"):
        prepare_compression(convnet, cfg)


def test_inc_prepare_pruning_route_does_not_recurse(inc, mlp, evaluate, digits):
    """INC's forward pre-hook calls on_step_begin on every forward, the search's eval_func included."""
    from neural_compressor.compression.pruner import prepare_pruning

    WeightPruningConfig, _ = inc
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                "de_options": {"population": 4, "generations": 1}}], target_sparsity=0.6,
                              pattern="1x1", start_step=0, end_step=0)
    opt = torch.optim.Adam(mlp.parameters(), 1e-3)
    prepare_pruning(mlp, cfg, optimizer=opt)
    for i in range(0, 128, 64):
        loss = torch.nn.functional.cross_entropy(mlp(digits.x_train[i:i + 64]), digits.y_train[i:i + 64])
        loss.backward()
        opt.step()
        opt.zero_grad()
    s = [float((mlp.get_submodule(n).weight == 0).float().mean()) for n in ("fc1", "fc2")]
    n1, n2 = mlp.fc1.weight.numel(), mlp.fc2.weight.numel()
    assert (s[0] * n1 + s[1] * n2) / (n1 + n2) == pytest.approx(0.6, abs=1e-3)


def test_inc_train_data_logged_as_one_line(inc, convnet, digits):
    import logging

    WeightPruningConfig, prepare_compression = inc
    x, y = images(digits)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    cfg = WeightPruningConfig([{"op_names": ["layer1.conv1"], "pruning_type": "random_coarse", "train_data": batches,
                                "eval_func": lambda m: 0.5}], target_sparsity=0.5, pattern="1xchannel",
                              start_step=0, end_step=0)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    inc_log = logging.getLogger("neural_compressor")  # INC's own logger does not propagate
    inc_log.addHandler(handler)
    try:
        prepare_compression(convnet, cfg)
    finally:
        inc_log.removeHandler(handler)
    text = "\n".join(seen)
    assert "<4 batches>" in text and "tensor(" not in text


def test_json_config_file_errors_say_yaml_needs_suffix(nni_pruner, tmp_path):
    import de_plugin_nni

    path = tmp_path / "cfg.txt"
    path.write_text("pruner: level\n")
    with pytest.raises(ValueError, match="YAML files need the .yaml suffix"):
        de_plugin_nni.load_config(path)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"pruner": "level", "config_list": [{"op_types": ["Linear"], "sparse_ratio": 0.5}],
                                "model": "lenet300"}))
    assert de_plugin_nni.load_config(path).pruner == "level"  # the same config as JSON is read


def test_nni_random_coarse_refuses_granularity_it_cannot_honour(nni_pruner, digits, evaluate):
    model = SmallResNet(widths=(8, 16, 16))
    cfg = [{"op_names": ["layer1.conv1"], "sparse_ratio": 0.5, "granularity": "in_channel"}]
    with pytest.raises(ValueError, match="random_coarse does not support granularity='in_channel'"):
        nni_pruner("random_coarse", model, cfg, nni_evaluator(model, digits, evaluate))


def test_inc_does_not_call_our_keys_unsupported(inc, mlp, evaluate, digits):
    import logging

    WeightPruningConfig, prepare_compression = inc
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    inc_log = logging.getLogger("neural_compressor")
    inc_log.addHandler(handler)
    try:
        cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                    "de_options": {"population": 4, "generations": 1}}], target_sparsity=0.5,
                                  pattern="1x1", start_step=0, end_step=0)
        prepare_compression(mlp, cfg)
    finally:
        inc_log.removeHandler(handler)
    assert not [m for m in seen if "not supported for config" in m], seen


def test_cli_checks_goal_and_options_before_any_data(capsys, monkeypatch):
    from de_plugin import cli as cli_mod

    monkeypatch.setattr(cli_mod, "load_idx_dataset", lambda *a, **k: pytest.fail("data loaded before the checks"))
    assert cli.main(["run", "--sparsity", "90"]) == 2
    assert "`sparsity` must lie in [0, 1)" in capsys.readouterr().err
    assert cli.main(["run", "--options", '{"populaton": 3}']) == 2
    assert "did you mean 'population'" in capsys.readouterr().err
    assert cli_mod.run_options("de_layerwise", {"population": 10}) == {"rounds": 4, "finetune_epochs": 2,
                                                                       "population": 10}
    assert "rounds" not in cli_mod.run_options("random_coarse", {})


@pytest.mark.parametrize("pruner,given,cap", [
    ("de_layerwise", {"rounds": 4, "finetune_epochs": 2}, 86),  # a tenth of 2 epochs of 430 batches
    ("de_layerwise", {"finalist_epochs": 2}, None),  # the user's choice stands
    ("de_layerwise", {"finalist_steps": 7}, 7),
    ("de_layerwise", {"selection": "holdout"}, None),  # no finalists retrained
    ("de_channel", {"macs": 0.5}, None),  # finalists=0 by default
    ("de_channel", {"macs": 0.5, "finalists": 3}, 43),  # finetune_epochs=1
    ("random_coarse", {}, None),
])
def test_main_job_caps_the_finalists_retraining_at_a_tenth_of_a_rounds_fine_tune(pruner, given, cap):
    from de_plugin import cli as cli_mod
    got = cli_mod.finalist_cap(pruner, given, 430)
    assert got.get("finalist_steps") == cap and {k: got[k] for k in given} == given


def test_nni_config_checked_before_data(nni_pruner, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("de_plugin.demo.data.load_idx_dataset", lambda *a, **k: pytest.fail("data loaded first"))
    path = tmp_path / "c.yaml"
    path.write_text("pruner: de_layerwise\noptions: {populaton: 3}\nconfig_list:\n"
                    "  - {op_types: [Linear], sparse_ratio: 0.8}\nmodel: lenet300\n")
    assert cli.main(["nni", str(path)]) == 2
    assert "did you mean 'population'" in capsys.readouterr().err
    path.write_text("pruner: de_layerwise\nconfig_list:\n  - {op_types: [Linear], sparse_ratio: 95}\nmodel: lenet300\n")
    assert cli.main(["nni", str(path)]) == 2
    assert "sparse_ratio=95 must lie in [0, 1)" in capsys.readouterr().err
    path.write_text("pruner: de_layerwise\nconfig_list:\n  - {op_types: [Linear], sparse_raito: 0.8}\nmodel: lenet300\n")
    assert cli.main(["nni", str(path)]) == 2
    assert "unknown key 'sparse_raito', not valid for NNI; did you mean 'sparse_ratio'?" in capsys.readouterr().err


def test_finetune_with_the_wrong_signature_refused_before_the_search(mlp, evaluate):
    ev = counted(evaluate)
    with pytest.raises(TypeError, match=r"`finetune` must accept 2 positional argument\(s\): finetune\(model, epochs\)"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=ev, finetune=lambda model: None, sparsity=0.5, progress=False)
    assert ev.calls == 0


def test_result_repr_is_short(mlp):
    r = de_plugin.prune(mlp, "uniform_magnitude", sparsity=0.5, progress=False, rounds=1, finetune_epochs=0)
    assert len(repr(r)) < 400 and "tensor(" not in repr(r)


def test_a_finished_run_is_not_overwritten_silently(tmp_path, capsys, monkeypatch):
    """`de-plugin run` / `de-plugin nni` refuse an --out that holds a result, before any work."""
    monkeypatch.setattr("de_plugin.demo.data.load_idx_dataset", lambda *a, **k: pytest.fail("data loaded first"))
    (tmp_path / "result.json").write_text('{"sparsity": 0.9}')
    assert cli.main(["run", "--out", str(tmp_path)]) == 2
    assert "already holds a result: choose another folder with --out DIR, or pass --overwrite" in capsys.readouterr().err
    pytest.importorskip("nni")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pruner: level\nconfig_list:\n  - {op_types: [Linear], sparse_ratio: 0.5}\nmodel: lenet300\n")
    assert cli.main(["nni", str(cfg), "--out", str(tmp_path)]) == 2
    assert "already holds a result" in capsys.readouterr().err
    assert (tmp_path / "result.json").read_text() == '{"sparsity": 0.9}'
