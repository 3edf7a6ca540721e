"""de_layerwise at depth: the deep reference models, grouped search, jDE, adaptive BN, bad input."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import de_plugin
from de_plugin.search.allocator import KeepSpace, population_for
from de_plugin.search.de import DifferentialEvolution
from de_plugin.demo.data import load_cifar10, load_idx_dataset
from de_plugin.demo.models import create_model
from de_plugin.search.grouping import GroupedSpace, resolve_groups
from de_plugin.targets import find_targets, get_param


def _data(n=64, seed=0, size=16):
    """Random images; 16x16 (the CIFAR ResNets are fully convolutional) keeps a 58-layer search fast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def _noop(model, epochs):
    pass


@pytest.fixture(scope="module")
def resnet56():
    torch.manual_seed(0)
    return create_model("resnet56", in_channels=1, width=0.25)


@pytest.mark.parametrize("name,layers", [("resnet20", 22), ("resnet56", 58), ("mobilenetv2", 53), ("vit", 26)])
def test_deep_models_run_and_expose_their_layers(name, layers):
    model = create_model(name, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    targets = find_targets(model)
    assert len(targets) == layers
    if name == "vit":  # attention projections are targets: in_proj_weight and out_proj of every block
        names = {t.name for t in targets}
        assert {f"blocks.{i}.attn.in_proj_weight" for i in range(6)} <= names
        assert {f"blocks.{i}.attn.out_proj.weight" for i in range(6)} <= names


def test_resnet56_round_keeps_the_exact_budget_and_layer_bounds(resnet56):
    x, val = _data()
    before = {k: v.clone() for k, v in resnet56.state_dict().items()}
    res = de_plugin.prune(resnet56, "de_layerwise", val_data=val, finetune=_noop, sparsity=0.8, rounds=1,
                          generations=2, recovery="none", max_layer_sparsity=0.95, min_layer_sparsity=0.3,
                          progress=False)
    targets = find_targets(resnet56)
    total = sum(t.numel for t in targets)
    zeros = sum(int((get_param(res.model, t) == 0).sum()) for t in targets)
    assert zeros == total - round(total * 0.2)  # the exact budget, over 58 layers
    for t in targets:
        s = float((get_param(res.model, t) == 0).float().mean())
        assert 0.3 - 1 / t.numel <= s <= 0.95 + 1 / t.numel, (t.name, s)
    assert all(torch.equal(v, resnet56.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    assert "sensitivity_scan" not in res.history[0]  # 58 layers > scan_max_layers: seeds stand in for the scan


def test_grouped_space_maps_back_to_exact_budgets():
    numels = np.array([100, 400, 900, 50, 2000])
    base = KeepSpace(numels, np.array([1, 4, 9, 1, 20]), numels.copy(), [(0.0, 0.99)] * 5)
    space = GroupedSpace(base, [[0, 1], [2, 3], [4]], offset=0.0)
    assert len(space.bounds) == 3
    counts = space.to_counts(np.array([0.5, 0.8, 0.9]))
    assert counts[0] == 50 and counts[1] == 200 and counts[2] == 180 and counts[3] == 10 and counts[4] == 200
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.uniform(0, 0.99, 3)
        keep = int(rng.integers(int(base.min_keep.sum()), int(numels.sum())))
        c = space.project(x, keep)
        assert c.sum() == keep
        assert np.all(c >= base.min_keep) and np.all(c <= base.max_keep)
    offs = GroupedSpace(base, [[0, 1], [2, 3], [4]], offset=0.1)
    assert len(offs.bounds) == 3 + 5
    v = offs.layer_values(np.array([0.5, 0.5, 0.5, 0.1, -0.1, 0.0, 0.05, -0.05]))
    np.testing.assert_allclose(v, [0.6, 0.4, 0.5, 0.55, 0.45])


def test_grouped_jde_search_same_seed_same_masks(resnet56):
    x, val = _data()
    kw = dict(val_data=val, finetune=_noop, sparsity=0.7, rounds=1, generations=2, recovery="none", progress=False,
              groups="stage", adaptation="jde", seed=3)
    a = de_plugin.prune(resnet56, "de_layerwise", **kw)
    b = de_plugin.prune(resnet56, "de_layerwise", **kw)
    assert a.layer_sparsity == b.layer_sparsity
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert set(a.history[0]["sensitivity_scan"]) == {"stem", "layer1", "layer2", "layer3", "fc"}  # scanned per group


def test_adaptive_bn_scoring_leaves_bn_statistics_untouched():
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, width=0.5)
    x, val = _data(n=128)
    with torch.no_grad():  # non-trivial statistics, so a re-estimate would show
        model.train()
        model(x * 3 + 1)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    calls = []

    def evaluate(m):
        calls.append(float(m.stem[1].running_mean.abs().sum()))
        return de_plugin.metrics.accuracy(torch.cat([m.eval()(b[0]) for b in val]), torch.cat([b[1] for b in val]))

    res = de_plugin.prune(model, "de_layerwise", evaluate=evaluate, finetune=_noop, sparsity=0.6, rounds=1,
                          generations=1, population=6, recovery="none", adaptive_bn=True, bn_batches=2,
                          train_data=[x[:32], x[32:64]], progress=False, sensitivity_scan=False)
    # candidates were scored with re-estimated statistics (the stem's mean differs from the saved one)...
    saved = float(stats["stem.1.running_mean"].abs().sum())
    assert any(abs(c - saved) > 1e-3 for c in calls)
    # ...and neither the user's model nor the pruned one keeps them
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k
        assert torch.equal(res.model.state_dict()[k], v), k


def test_jde_adapts_and_resumes_bit_identically():
    def sphere(x):
        return float(np.sum((x - 0.3) ** 2))

    kw = dict(popsize=8, maxiter=12, seed=1, adaptation="jde")
    a = DifferentialEvolution([(-1, 1)] * 6, **kw)
    b = None
    while not a.done:
        xs = a.ask()
        a.tell([sphere(x) for x in xs])
        if a.nit == 5 and b is None:
            b = DifferentialEvolution.from_state(a.state_dict())
    while not b.done:
        xs = b.ask()
        b.tell([sphere(x) for x in xs])
    np.testing.assert_array_equal(a.population, b.population)
    np.testing.assert_array_equal(a.F, b.F)
    assert len(set(np.round(a.F, 6))) > 1  # the members' F drifted apart
    assert a.result().fun < 0.5 * a.history[0]["best_fun"]  # and the search still converges


def test_population_is_sized_with_the_dimension():
    assert population_for(None, 22) == 20 and population_for(None, 58) == 29 and population_for(None, 400) == 64
    assert population_for(12, 58) == 12
    with pytest.raises(ValueError, match="at least 20"):
        population_for(8, 200)


@pytest.mark.parametrize("opts,match", [
    ({"groups": {"a": ["layer1.*"], "b": ["layer2.*", "layer3.*"]}}, "in no group"),
    ({"groups": {"a": ["layer1.*", "stem.*", "fc.*"], "b": ["layer1.0.*", "layer2.*", "layer3.*"]}}, "in two groups"),
    ({"groups": {"a": ["*"], "b": ["nothing.*"]}}, "match no pruned layer"),
    ({"groups": "stages"}, "unknown groups"),
    ({"groups": 500}, "between 1 and 58"),
    ({"population": 4}, "too small for a 58-dimensional search"),
    ({"adaptive_bn": True}, "train_data"),
])
def test_bad_deep_options_fail_before_any_work(resnet56, opts, match):
    before = {k: v.clone() for k, v in resnet56.state_dict().items()}
    calls = []

    def evaluate(m):
        calls.append(1)
        return 0.5

    with pytest.raises(ValueError, match=match):
        de_plugin.prune(resnet56, "de_layerwise", evaluate=evaluate, finetune=_noop, sparsity=0.5, progress=False,
                        inplace=True, **opts)
    assert not calls
    assert all(torch.equal(v, resnet56.state_dict()[k]) for k, v in before.items())


def test_groupings_cover_every_layer_once():
    for name in ("resnet20", "mobilenetv2", "vit"):
        model = create_model(name, in_channels=1)
        targets = find_targets(model)
        for spec in ("stage", "block", "type", 4):
            groups = resolve_groups(spec, targets, model)
            idx = sorted(i for _, g in groups for i in g)
            assert idx == list(range(len(targets))), (name, spec)
    mnv2 = create_model("mobilenetv2", in_channels=1)
    kinds = dict(resolve_groups("type", find_targets(mnv2), mnv2))
    assert len(kinds["depthwise"]) == 17  # one per inverted residual; the 1-channel stem is a conv3x3
    assert kinds["conv3x3"] == [0]


def test_fashion_mnist_padded_to_32(tmp_path):
    pytest.importorskip("numpy")
    from de_plugin.demo.data import FASHION_MNIST_DIR
    import os
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("dataset-fashion-mnist not installed")
    d = load_idx_dataset(train_limit=64, test_limit=32, val_size=32, size=32)
    assert d.x_train.shape[1:] == (1, 32, 32) and d.x_test.shape[1:] == (1, 32, 32)
    assert torch.all(d.x_train[:, :, :2, :] == 0)  # the border is the (normalised) mean


def test_cifar10_folder_loader(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, 20))}, f)
    d = load_cifar10(tmp_path, val_size=10)
    assert d.sizes() == {"train": 90, "val": 10, "test": 20}
    assert d.x_train.shape[1:] == (3, 32, 32)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch.*nothing is downloaded"):
        load_cifar10(tmp_path)


def test_multi_fidelity_scores_on_a_subset_and_rescores_the_finalists(resnet56):
    x, val = _data(n=128)  # 4 batches: the search scores on the first one, the finalists on all four
    kw = dict(val_data=val, finetune=_noop, sparsity=0.7, rounds=1, generations=2, recovery="none", progress=False,
              fidelity=0.25, rescore_top=3, seed=1)
    a = de_plugin.prune(resnet56, "de_layerwise", **kw)
    b = de_plugin.prune(resnet56, "de_layerwise", **kw)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)  # same seed, same masks
    full = de_plugin.metrics.accuracy(torch.cat([a.model.eval()(v[0]) for v in val]), torch.cat([v[1] for v in val]))
    # the round's reported pre-fine-tune score is the full-data score of the chosen masks, not the subset's
    assert a.history[0]["val_accuracy_before_finetune"] == pytest.approx(full, abs=1e-6)
    assert a.sparsity == pytest.approx(0.7, abs=1e-3)


def test_search_images_is_multi_fidelity_by_size(resnet56):
    x, val = _data(n=128)  # 4 batches of 32
    kw = dict(val_data=val, finetune=_noop, sparsity=0.7, rounds=1, generations=2, recovery="none", progress=False,
              rescore_top=3, seed=1)
    by_share = de_plugin.prune(resnet56, "de_layerwise", fidelity=0.25, **kw)
    by_size = de_plugin.prune(resnet56, "de_layerwise", search_images=20, **kw)  # one batch holds >= 20 images
    assert all(torch.equal(by_share.masks[k], by_size.masks[k]) for k in by_share.masks)
    all_data = de_plugin.prune(resnet56, "de_layerwise", search_images=None, **kw)
    small_val = de_plugin.prune(resnet56, "de_layerwise", search_images=128, **kw)  # val_data is not larger: all
    assert all(torch.equal(all_data.masks[k], small_val.masks[k]) for k in all_data.masks)


def test_stall_default_stops_deep_searches_that_stopped_improving(resnet56):
    kw = dict(evaluate=lambda m: 0.5, finetune=_noop, sparsity=0.7, rounds=1, generations=6, recovery="none",
              progress=False, seed=0)  # a flat fitness: no generation can improve on the seeds
    deep = de_plugin.prune(resnet56, "de_layerwise", **kw)
    assert deep.history[0]["de"]["nit"] == 3 and "did not improve for 3" in deep.history[0]["de"]["message"]
    every = de_plugin.prune(resnet56, "de_layerwise", stall=0, **kw)
    assert every.history[0]["de"]["nit"] == 6
    torch.manual_seed(0)
    lenet = create_model("lenet300")  # 3 values: every generation runs by default
    shallow = de_plugin.prune(lenet, "de_layerwise", **kw)
    assert shallow.history[0]["de"]["nit"] == 6


def test_multi_fidelity_needs_val_data(resnet56):
    with pytest.raises(ValueError, match="fidelity.*val_data"):
        de_plugin.prune(resnet56, "de_layerwise", evaluate=lambda m: 0.5, finetune=_noop, sparsity=0.5,
                        fidelity=0.2, progress=False)


def test_vit_fine_tunes_with_masks_held_on_attention_projections():
    """out_proj.weight is read by MultiheadAttention's forward, not out_proj's: masks must still be
    recomputed every step (splicing trains several steps), and stay applied afterwards."""
    torch.manual_seed(0)
    model = create_model("vit", in_channels=1, image_size=16, dim=32, depth=2, heads=2)
    x, val = _data(n=64)
    opt_steps = []

    def finetune(m, epochs):
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        m.train()
        for _ in range(epochs):
            for xb, yb in val:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(xb), yb).backward()
                opt.step()
                opt_steps.append(1)

    res = de_plugin.prune(model, "de_layerwise", val_data=val, finetune=finetune, sparsity=0.8, rounds=1,
                          finetune_epochs=2, generations=1, population=6, recovery="splicing", selection="holdout",
                          progress=False)
    assert len(opt_steps) == 4  # the round's 2 epochs of 2 batches (no finalists' short fine-tunes)
    for t in find_targets(model):
        w = get_param(res.model, t)
        assert torch.all(w[~res.masks[t.name]] == 0), t.name
    assert not any(m._forward_pre_hooks for m in res.model.modules())
