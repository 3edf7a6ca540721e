"""INC adapter: pruning_type='de_layerwise' in INC's own loop, both search placements, patterns,
schedules, and INC quantization keeping pruned weights at integer zero."""
import copy

import pytest
import torch
import torch.nn.functional as F
from neural_compressor.training import WeightPruningConfig, prepare_compression
from torch.utils.data import DataLoader, TensorDataset

import de_plugin_inc
from conftest import same_state, state_of

DE = {"population": 6, "generations": 2}


def train_with(cm, model, digits, epochs=1, on_step=None):
    """The INC callback loop of its documentation."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    cm.callbacks.on_train_begin()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(digits.y_train))
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            cm.callbacks.on_step_begin(step)
            F.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx]).backward()
            cm.callbacks.on_before_optimizer_step()
            opt.step()
            cm.callbacks.on_after_optimizer_step()
            opt.zero_grad()
            cm.callbacks.on_step_end()
            if on_step:
                on_step(step)
            step += 1
    cm.callbacks.on_train_end()


def layer_sparsity(model, names=("fc1", "fc2")):
    return {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in names}


def the_pruner(cm):
    return cm.callbacks.callbacks_list[0].pruners[0]


@pytest.mark.parametrize("pattern,schedule,tol", [("1x1", (0, 0, 1), 1e-9), ("4x1", (0, 18, 6), 0.01)])
def test_layers_end_at_their_searched_targets(mlp, evaluate, digits, pattern, schedule, tol):
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                "de_options": DE}], target_sparsity=0.8, pattern=pattern, start_step=schedule[0],
                              end_step=schedule[1], pruning_frequency=schedule[2])
    cm = prepare_compression(mlp, cfg)
    seen = []
    train_with(cm, mlp, digits, on_step=lambda s: seen.append(sum(layer_sparsity(mlp).values()) / 2))
    targets = the_pruner(cm).layer_targets
    assert set(targets) == {"fc1", "fc2"}  # INC leaves the classifier (last Linear) out
    assert targets["fc1"] != pytest.approx(0.8, abs=1e-3)  # per-layer, not clipped to the global target
    for name, s in layer_sparsity(mlp).items():
        assert s == pytest.approx(targets[name], abs=tol)
    n1, n2 = mlp.fc1.weight.numel(), mlp.fc2.weight.numel()
    assert (targets["fc1"] * n1 + targets["fc2"] * n2) / (n1 + n2) == pytest.approx(0.8, abs=1e-3)
    if pattern == "4x1":  # the iterative schedule ramps up
        assert seen[1] < seen[schedule[1]] - 0.1
        blocks = (mlp.fc1.weight == 0).reshape(16, 4, 64).all(1) | (mlp.fc1.weight != 0).reshape(16, 4, 64).all(1)
        assert blocks.all(), "4x1 blocks are pruned whole"


def test_search_config_placement(mlp, evaluate, digits):
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise"}], target_sparsity=0.75,
                              pattern="1x1", start_step=0, end_step=0)
    before = state_of(mlp)
    ready = de_plugin_inc.search_config(mlp, cfg, evaluate, **DE)
    assert same_state(before, state_of(mlp))  # the search does not touch the model
    entries = ready.pruning_configs
    assert [e["op_names"] for e in entries] == [["^fc1$"], ["^fc2$"]]  # anchored: fc does not match fc1
    assert all(e["pruning_type"] == "magnitude" for e in entries)
    cm = prepare_compression(mlp, ready)
    train_with(cm, mlp, digits)
    got = layer_sparsity(mlp)
    for e in entries:
        assert got[e["op_names"][0][1:-1]] == pytest.approx(e["target_sparsity"], abs=1e-3)
    assert entries[0]["target_sparsity"] != pytest.approx(entries[1]["target_sparsity"], abs=1e-3)


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_int8_keeps_pruned_weights_zero(mlp, evaluate, digits, approach, tmp_path):
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                "de_options": DE}], target_sparsity=0.6, pattern="1x1", start_step=0, end_step=0)
    cm = prepare_compression(mlp, cfg)
    train_with(cm, mlp, digits)
    masks = {n: mlp.get_submodule(n).weight != 0 for n in ("fc1", "fc2")}
    calib = DataLoader(TensorDataset(digits.x_train[:256], digits.y_train[:256]), batch_size=64)
    q = de_plugin_inc.quantize(copy.deepcopy(mlp), approach, calib_dataloader=calib, workspace=str(tmp_path))
    assert (tmp_path / "nc_workspace").is_dir()  # INC's files go where asked, not into the checkout
    ints = de_plugin_inc.int8_weights(q)
    for n, m in masks.items():
        assert (~m).float().mean() >= 0.5
        assert torch.all(ints[n][~m] == 0), f"{n}: pruned weights must be int 0 after {approach} quantization"
    assert evaluate(q.model) > 0.8


def test_pruning_then_qat_in_one_prepare_compression(mlp, evaluate, digits):
    from neural_compressor import QuantizationAwareTrainingConfig

    prune = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                  "de_options": DE}], target_sparsity=0.6, pattern="1x1", start_step=0, end_step=0)
    cm = prepare_compression(mlp, [prune, QuantizationAwareTrainingConfig()])  # pruning config first
    model = cm.model.model
    train_with(cm, model, digits)
    targets = the_pruner(cm).layer_targets
    q = cm.model.model
    assert evaluate(q) > 0.5
    ints = de_plugin_inc.int8_weights(cm.model)
    assert ints, "QAT produced quantized layers"
    for n in targets:
        # prepare_compression may rename modules when it converts; match by suffix
        key = next(k for k in ints if k.endswith(n))
        assert float((ints[key] == 0).float().mean()) >= targets[n] - 1e-3


@pytest.mark.parametrize(
    "entry,exc,match",
    [
        ({"op_names": ["fc.*"], "pruning_type": "de_layerwise"}, ValueError, "needs 'eval_func'"),
        ({"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": 0.9}, TypeError, "callable"),
        ({"op_names": ["conv.*"], "pruning_type": "de_layerwise", "eval_func": len}, ValueError, "match no"),
        ({"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": len, "de_options": {"populaton": 3}},
         ValueError, "did you mean"),
        ({"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": len, "de_options": {"groups": "stages"}},
         ValueError, "unknown groups"),
    ],
)
def test_bad_input_before_training_model_untouched(mlp, entry, exc, match):
    before = state_of(mlp)
    with pytest.raises(exc, match=match):
        prepare_compression(mlp, WeightPruningConfig([entry], target_sparsity=0.8, pattern="1x1"))
    assert same_state(before, state_of(mlp))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in mlp.modules())


def test_target_outside_range(mlp, evaluate):
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate}],
                              target_sparsity=1.0, pattern="1x1")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prepare_compression(mlp, cfg)


def _resnet_and_batches(digits):
    from de_plugin.demo.models import SmallResNet
    from de_plugin.demo.training import train

    torch.manual_seed(0)
    model = train(SmallResNet(widths=(8, 16, 16)), digits.x_train, digits.y_train, epochs=2, lr=3e-3, batch_size=64)
    return model, [(digits.x_train[i:i + 64], digits.y_train[i:i + 64]) for i in range(0, 256, 64)]


def dead_filters(model, name):
    return model.get_submodule(name).weight.flatten(1).abs().sum(1) == 0


@pytest.mark.parametrize("route", ["loop", "search_config"])
def test_random_coarse_whole_filters_in_inc_loop(digits, evaluate, route):
    model, batches = _resnet_and_batches(digits)
    layers = ["layer1.conv1", "layer2.conv1", "layer3.conv1"]
    sched = {"target_sparsity": 0.5, "start_step": 0, "end_step": 4, "pruning_frequency": 2}
    if route == "loop":
        config = WeightPruningConfig([{"op_names": ["layer.\\.conv1"], "pruning_type": "random_coarse", "eval_func": evaluate,
                                       "train_data": batches, "coarse_options": {"candidates": 3, "bn_batches": 2}}],
                                     pattern="1xchannel", **sched)
    else:
        config = de_plugin_inc.search_config(
            model, WeightPruningConfig([{"op_names": ["layer.\\.conv1"], "pruning_type": "random_coarse"}], **sched),
            evaluate, train_data=batches, coarse_options={"candidates": 3, "bn_batches": 2})
        entries = {e["op_names"][0]: e for e in config.pruning_configs}
        assert entries["^layer3\\.conv1$"]["pattern"] == "1x144"  # kh*kw*C_in = 3*3*16
    cm = prepare_compression(model, config)
    train_with(cm, model, digits)
    for n in layers:
        dead = dead_filters(model, n)
        assert int(dead.sum()) == dead.numel() // 2, n
        if route == "search_config":
            assert torch.equal(~dead, torch.tensor(entries[f"^{n.replace('.', chr(92) + '.')}$"]["channel_keep"]))


def test_de_channel_meets_its_macs_budget_in_inc_loop(digits, evaluate):
    import numpy as np

    from de_plugin.channels.channel import ChannelOptions, channel_space
    from de_plugin.targets import find_targets

    model, batches = _resnet_and_batches(digits)
    layers = ["layer1.conv1", "layer2.conv1", "layer3.conv1"]
    config = WeightPruningConfig([{"op_names": ["layer.\\.conv1"], "pruning_type": "de_channel", "eval_func": evaluate,
                                   "train_data": batches,
                                   "channel_options": {"macs": 0.8, "population": 6, "generations": 2, "bn_batches": 2}}],
                                 pattern="1xchannel", target_sparsity=0.5, start_step=0, end_step=4, pruning_frequency=2)
    cm = prepare_compression(model, config)
    train_with(cm, model, digits)
    kept = {n: int((~dead_filters(model, n)).sum()) for n in layers}
    assert any(k < model.get_submodule(n).out_channels for n, k in kept.items())  # whole filters removed
    # the kept filters are an allocation within the budget, by the core's cost model over those layers
    space, cost = channel_space(model, digits.x_val[:2], find_targets(model, layers, None, None),
                                ChannelOptions(macs=0.8))
    q = np.array([kept[g.producers[0]] for g in space.groups])
    assert 0.7 < cost.macs(q) / cost.macs_dense <= 0.8


def test_de_channel_inc_needs_a_budget(digits, evaluate):
    model, _ = _resnet_and_batches(digits)
    config = WeightPruningConfig([{"op_names": ["layer1.conv1"], "pruning_type": "de_channel", "eval_func": evaluate}],
                                 target_sparsity=0.5, pattern="1xchannel", start_step=0, end_step=2)
    with pytest.raises(ValueError, match="channel_options with its budget"):
        cm = prepare_compression(model, config)
        train_with(cm, model, digits)


def test_de_channel_inc_refuses_options_its_loop_owns(digits, evaluate):
    model, _ = _resnet_and_batches(digits)
    config = WeightPruningConfig([{"op_names": ["layer1.conv1"], "pruning_type": "de_channel", "eval_func": evaluate,
                                   "channel_options": {"macs": 0.8, "finalists": 2}}],
                                 target_sparsity=0.5, pattern="1xchannel", start_step=0, end_step=2)
    with pytest.raises(ValueError, match=r"\['finalists'\].*INC's loop retrains"):
        cm = prepare_compression(model, config)
        train_with(cm, model, digits)


def test_random_coarse_inc_wrong_pattern(digits, evaluate):
    model, _ = _resnet_and_batches(digits)
    config = WeightPruningConfig([{"op_names": ["layer1.conv1"], "pruning_type": "random_coarse", "eval_func": evaluate}],
                                 target_sparsity=0.5, pattern="1x8", start_step=0, end_step=2)
    with pytest.raises(ValueError, match="needs pattern '1x72'"):
        cm = prepare_compression(model, config)
        train_with(cm, model, digits)


def test_search_on_process_workers_gives_the_serial_targets(mlp, evaluate):
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise"}], target_sparsity=0.8,
                              pattern="4x1", start_step=0, end_step=0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker's thread count: bit-identical scores
    try:
        serial = de_plugin_inc.search_config(mlp, cfg, evaluate, **DE)
        proc = de_plugin_inc.search_config(mlp, cfg, evaluate, **DE, backend="process", workers=2)
    finally:
        torch.set_num_threads(n)
    assert [e["target_sparsity"] for e in serial.pruning_configs] == [e["target_sparsity"] for e in proc.pruning_configs]
    with pytest.raises(ValueError, match="batched"):
        de_plugin_inc.search_config(mlp, cfg, evaluate, **DE, backend="batched")


def test_inc_shared_default_exclusions_are_not_polluted(digits, evaluate):
    """INC appends the classifier name to WeightPruningConfig's shared default list; patched."""
    model, _ = _resnet_and_batches(digits)
    cm = prepare_compression(model, WeightPruningConfig([{"op_names": ["layer1.conv1"], "pruning_type": "magnitude"}], target_sparsity=0.5,
                                                        start_step=0, end_step=0))
    train_with(cm, model, digits)
    assert WeightPruningConfig.__init__.__defaults__[5] == []  # excluded_op_names default untouched


def test_grouped_search_on_a_deep_resnet(evaluate):
    """de_options groups='stage' (no offsets): one sparsity per stage over INC's 57 conv layers, exact budget."""
    from de_plugin.demo.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet56", in_channels=1, width=0.25)  # fully convolutional: runs on 8x8 digits
    cfg = WeightPruningConfig([{"op_names": ["stem.*", "layer.*"], "pruning_type": "de_layerwise"}],
                              target_sparsity=0.6, pattern="1x1", start_step=0, end_step=0)
    ready = de_plugin_inc.search_config(model, cfg, evaluate, population=6, generations=1, groups="stage",
                                        group_offset=0.0)
    targets = {e["op_names"][0][1:-1].replace("\\", ""): e["target_sparsity"] for e in ready.pruning_configs}
    assert len(targets) == 57
    numel = {n: model.get_submodule(n).weight.numel() for n in targets}
    overall = sum(targets[n] * numel[n] for n in targets) / sum(numel.values())
    assert overall == pytest.approx(0.6, abs=1e-3)
    per_stage = {}
    for n, t in targets.items():
        per_stage.setdefault(n.split(".")[0], set()).add(round(t, 2))
    assert all(len(v) <= 2 for v in per_stage.values())  # one value per stage (up to count rounding)


@pytest.mark.parametrize("pattern, ratio", [("1x1", 0.75), ("4x1", 0.5), ("2:4", 0.5), ("2:4", 0.25)])
def test_core_patterns_equal_inc37_pattern_masks(pattern, ratio):
    """INC 3.8+ has no patterns, so its route masks with the core's: the same masks INC 3.7 applies."""
    from neural_compressor.compression.pruner.patterns import get_pattern
    from neural_compressor.compression.pruner.utils import process_config

    from de_plugin.adapter import pattern_mask
    from de_plugin_inc.patterns import layer_mask

    torch.manual_seed(0)
    mods = {"conv": torch.nn.Conv2d(4, 8, 3), "fc": torch.nn.Linear(16, 8)}
    info = process_config(WeightPruningConfig([{"op_names": [".*"]}], target_sparsity=ratio, pattern=pattern))[0]
    inc_pattern = get_pattern(info, mods)
    for name, mod in mods.items():
        w = mod.weight.detach()
        score = inc_pattern.reduce_score(w.abs(), name) if hasattr(inc_pattern, "reduce_score") else w.abs()
        inc = layer_mask(inc_pattern, name, score, ratio, ratio, torch.ones_like(w, dtype=torch.bool)).bool()
        ours = pattern_mask(w, ratio, pattern)
        assert torch.equal(inc, ours) and float((~ours).float().mean()) == ratio


def test_de_options_are_validated_once_per_entry(mlp, evaluate, digits, monkeypatch):
    """An entry's de_options are validated when INC builds the pruner (before any training) and that object
    is what the search runs with: counted where pydantic builds the search options."""
    from de_plugin.search.allocator import SearchOptions

    built, init = [], SearchOptions.__init__
    monkeypatch.setattr(SearchOptions, "__init__",  # the search's own options (not the grouping check's)
                        lambda self, **d: (type(self) is SearchOptions and built.append(d)) or init(self, **d))
    cfg = WeightPruningConfig([{"op_names": ["fc.*"], "pruning_type": "de_layerwise", "eval_func": evaluate,
                                "de_options": {**DE, "population": 7}}], target_sparsity=0.8, pattern="1x1",
                              start_step=0, end_step=0, pruning_frequency=1)
    cm = prepare_compression(mlp, cfg)
    assert len(built) == 1 and built[0]["population"] == 7
    train_with(cm, mlp, digits)
    assert the_pruner(cm).layer_targets is not None  # searched
    assert len(built) == 1
