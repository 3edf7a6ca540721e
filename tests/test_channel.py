"""de_channel: DE over per-group channel counts under a MACs / parameter budget."""
import copy

import numpy as np
import pytest
import torch

import de_plugin
from conftest import same_state, state_of
from de_plugin.adapter import slice_channels
from de_plugin.channels.channel import ChannelOptions, ChannelScorer, channel_space
from de_plugin.channels.cost import ChannelSpace
from de_plugin.channels.coarse import count_macs
from de_plugin.demo.models import SmallResNet, create_model
from de_plugin.demo.training import make_finetune
from de_plugin.targets import find_targets


@pytest.fixture
def ft(images):
    return make_finetune(images.x, images.y, lr=1e-3, batch_size=64)


FAST = dict(generations=2, population=6, rounds=2, bn_batches=2, progress=False)


def run(model, images, ft, **kw):
    return de_plugin.prune(model, "de_channel", val_data=images.val, train_data=images.batches, finetune=ft,
                           **{**FAST, **kw})


@pytest.mark.parametrize("name,linear", [("resnet20", False), ("mobilenetv2", False), ("vit", True)])
def test_closed_form_cost_equals_counted_macs_and_params(name, linear):
    model = create_model(name, in_channels=1, **({"width": 0.5} if name == "resnet20" else {})).eval()
    x = torch.randn(2, 1, 32, 32)
    space, cost = channel_space(model, x, find_targets(model, None, None, None),
                                ChannelOptions(macs=0.5, include_linear=linear))
    scorer = ChannelScorer(model, space, cost, lambda m: 0.0, None, 1)
    rng = np.random.default_rng(0)
    for _ in range(4):
        q = np.array([rng.integers(1, s + 1) for s in cost.size])
        counted = count_macs(model, x, space.masks(scorer.candidate(q)))
        assert cost.macs(q) == pytest.approx(counted["macs"], abs=0.5)
        assert cost.params(q) == pytest.approx(counted["params"], abs=0.5)


@pytest.mark.parametrize("measure", ["macs", "params"])
def test_projection_fills_the_budget_without_exceeding_it(measure):
    model = create_model("mobilenetv2", in_channels=1).eval()
    space, cost = channel_space(model, torch.randn(2, 1, 32, 32), find_targets(model, None, None, None),
                                ChannelOptions(macs=0.5))
    proj = ChannelSpace(cost, measure, np.ones(len(cost.size), dtype=np.int64), cost.size.copy(), 0.9)
    rng = np.random.default_rng(1)
    for frac in (0.3, 0.5, 0.8):
        budget = frac * cost.dense(measure)
        for _ in range(3):
            q = proj.project(rng.uniform(0, 0.9, len(cost.size)), budget)
            assert cost.cost(q, measure) <= budget
            for g in np.flatnonzero(q < cost.size):  # maximal: no group can keep one more unit
                more = q.copy()
                more[g] += 1
                assert cost.cost(more, measure) > budget


def test_macs_budget_met_masks_zero_and_speedup_output_equal(resnet, images, ft):
    r = run(resnet, images, ft, macs=0.5)
    assert 0.45 < r.extra["macs_kept"] <= 0.5
    assert [h["budget"] for h in r.history] == pytest.approx([0.5 ** 0.5, 0.5])
    assert all(h["macs"] <= h["budget"] + 1e-9 for h in r.history)
    assert all(b <= a for a, b in zip(r.history[0]["q"], r.history[1]["q"]))  # removed channels stay removed
    state = r.model.state_dict()
    for name, mask in r.extra_masks.items():
        assert not state[name][~mask].any(), name  # removed channels are zero, biases and BN terms included
    model = r.model.eval()
    x = images.xv[:16]
    with torch.no_grad():
        before = model(x)
        slice_channels(model, x[:2], r.extra_masks)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == r.extra["params"]
    assert count_macs(model, x[:2])["macs_dense"] == r.extra["macs"]


def test_params_budget_and_random_channel_choice(resnet, images, ft):
    r = run(resnet, images, ft, params=0.6, channel_choice="random", candidates=3)
    assert 0.5 < r.extra["params_kept"] <= 0.6
    assert len(r.history[-1]["de"]["random_scores"]) == 3


def test_a_killed_run_resumes_to_the_same_masks(resnet, images, ft, tmp_path):
    a = run(copy.deepcopy(resnet), images, ft, macs=0.6, seed=3)
    calls = {"n": 0}

    def dies_in_round_two(model, epochs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        ft(model, epochs)

    ck = str(tmp_path / "ch.ckpt")
    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(resnet), images, dies_in_round_two, macs=0.6, seed=3, checkpoint=ck)
    c = run(copy.deepcopy(resnet), images, ft, macs=0.6, seed=3, checkpoint=ck, resume=True)
    assert [h["q"] for h in c.history] == [h["q"] for h in a.history]
    assert all(torch.equal(a.extra_masks[k], c.extra_masks[k]) for k in a.extra_masks)


def test_de_channel_is_stepped_like_the_round_runner(resnet, images, ft):
    """The user owns the loop (``runner.start / step / finish``), as with de_layerwise: the same rounds and
    masks as ``prune``; a finished run refuses another step."""
    from de_plugin.adapter import Context, check_batches, create_pruner
    from de_plugin.evaluation import evaluator_from_batches

    evaluate = evaluator_from_batches(images.val, "accuracy")
    whole = de_plugin.prune(copy.deepcopy(resnet), "de_channel", evaluate=evaluate, train_data=images.batches,
                            finetune=ft, macs=0.6, seed=1, **FAST)
    model = copy.deepcopy(resnet)
    pruner = create_pruner("de_channel", macs=0.6, **{k: v for k, v in FAST.items() if k != "progress"})
    ctx = Context(model=model, targets=find_targets(model), evaluate=evaluate, finetune=ft, sparsity=None,
                  max_accuracy_drop=None, seed=1, progress=False,
                  train_batches=check_batches(images.batches, "train_data", pairs=False))
    runner = pruner.runner()
    runner.start(ctx)
    records = []
    while not runner.done:
        records.append(runner.step())
    out = runner.finish()
    pruner.close()
    assert len(records) == FAST["rounds"]
    assert [r["q"] for r in records] == [h["q"] for h in whole.history]
    assert all(torch.equal(out.extra_masks[k], whole.extra_masks[k]) for k in whole.extra_masks)
    with pytest.raises(RuntimeError, match="finished"):
        runner.step()


def test_loss_fitness_scores_the_search_by_minus_the_cross_entropy(resnet, images, ft):
    """metric="neg_loss" (BENCHMARKS: it retrains better than accuracy): the search's recorded score is the
    pruned model's negative loss on val_data, not an accuracy."""
    from de_plugin.evaluation import DeviceBatches, metric_on_batches
    from de_plugin.metrics import neg_loss

    r = run(resnet, images, ft, macs=0.5, rounds=1, finetune_epochs=0, metric="neg_loss")
    score = r.history[0]["val_accuracy_before_finetune"]
    assert score < 0 and r.extra["macs_kept"] <= 0.5
    assert score == pytest.approx(metric_on_batches(r.model.eval(), DeviceBatches(images.val), neg_loss), abs=1e-4)


def test_finalists_are_reranked_after_a_short_retraining_from_the_same_weights(resnet, images, ft):
    dense = {k: v.clone() for k, v in resnet.state_dict().items()}
    calls = []

    def recording(model, epochs):
        calls.append((epochs, {k.replace("_orig", ""): v.clone() for k, v in model.state_dict().items()
                               if v.dim() == 4 and not k.endswith("_mask")}))
        ft(model, epochs)

    r = run(resnet, images, recording, macs=0.5, rounds=1, finalists=2, finetune_epochs=2)
    fin = r.history[0]["de"]["finalists"]
    assert len({tuple(f["q"]) for f in fin}) == len(fin) >= 3  # two of the search's and at least the uniform seed
    assert r.history[0]["q"] == max(fin, key=lambda f: f["score_after_short_finetune"])["q"]
    assert r.extra["macs_kept"] <= 0.5
    assert [e for e, _ in calls] == [1] * len(fin) + [2]  # one short retraining per finalist, then the final one
    for _, state in calls:  # each starts from the dense weights (pruned), not from the last finalist's training
        for k, w in state.items():
            kept = w != 0
            assert torch.equal(w[kept], dense[k][kept]), k


def test_finalists_without_finetune_fail_before_any_work(resnet, images):
    before = state_of(resnet)
    with pytest.raises(ValueError, match="finalists=2.*finetune"):
        de_plugin.prune(resnet, "de_channel", val_data=images.val, train_data=images.batches, macs=0.5, finalists=2,
                        inplace=True, progress=False)
    assert same_state(before, state_of(resnet))


def test_finalists_beyond_the_population_are_refused_before_any_work(resnet, images, ft):
    before = state_of(resnet)
    with pytest.raises(ValueError, match="finalists=30.*population"):
        de_plugin.prune(resnet, "de_channel", val_data=images.val, train_data=images.batches, finetune=ft,
                        macs=0.5, finalists=30, population=8, inplace=True, progress=False)
    assert same_state(before, state_of(resnet))


@pytest.mark.parametrize("kw,match", [
    ({}, "exactly one budget"),
    ({"macs": 0.5, "params": 0.5}, "exactly one budget"),
    ({"macs": 1.5}, "macs"),
    ({"macs": 0.0}, "macs"),
    ({"macs": 0.02}, r"out of reach.*smallest reachable is macs=0\.\d+"),
    ({"macs": 0.5, "sparsity": 0.5}, "budget option"),
])
def test_bad_budgets_fail_before_any_work(resnet, images, kw, match):
    before = state_of(resnet)
    calls = {"n": 0}

    def ft(model, epochs):
        calls["n"] += 1

    with pytest.raises(ValueError, match=match):
        de_plugin.prune(resnet, "de_channel", val_data=images.val, train_data=images.batches, finetune=ft, inplace=True,
                        progress=False, **kw)
    assert calls["n"] == 0 and same_state(before, state_of(resnet))


def test_latency_budget_is_checked_by_measuring_the_sliced_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1)  # 32x32 inputs: its convs, not per-op overhead, dominate
    x, y = torch.randn(96, 1, 32, 32), torch.randint(0, 10, (96,))
    cache = tmp_path / "lat"
    r = de_plugin.prune(model, "de_channel", latency=0.85, latency_batch=32, latency_cache=str(cache), max_group_ratio=0.9,
                        val_data=[(x[:32], y[:32])], train_data=[(x[32:], y[32:])], rounds=1, generations=1,
                        population=4, finetune_epochs=0, bn_batches=1, progress=False)
    h = r.history[-1]
    # every allocation tried was sliced and measured; the one kept is the slowest within 5% over the budget
    # (or, when none was, the fastest), and its measured share is what is reported
    assert h["latency"] in h["de"]["latency_measured"]
    assert h["latency"] <= 0.85 * 1.05 or h["latency"] == min(h["de"]["latency_measured"])
    assert r.extra["macs_kept"] < 1.0
    files = list(cache.glob("*.json"))
    assert len(files) == 1  # the per-layer table and its fit, cached for this model, batch and thread count
    data = __import__("json").loads(files[0].read_text())
    assert "fit" in data and {"stem.0", "layer1.0.conv1", "fc"} <= set(data["layers"])


def test_latency_table_interpolates_and_is_monotone():
    from de_plugin.channels.latency import LatencyTable

    model = SmallResNet(widths=(8, 16, 16)).eval()
    table = LatencyTable(model, torch.randn(2, 1, 8, 8), {"layer1.conv1": (True, False)}, batch=8, cache=None,
                         repeats=3)
    grid = table.layers["layer1.conv1"]
    assert grid["g0"] == [0.125, 0.25, 0.5, 0.75, 1.0] and grid["g1"] == [1.0]
    assert table.layers["fc"]["g0"] == [1.0]  # untouched layers are timed once, at full size
    col = [row[0] for row in grid["t"]]
    rest = table.layer_time({}, {}) - col[-1]  # every other layer at full size
    at = lambda share: table.layer_time({"layer1.conv1": share}, {}) - rest  # noqa: E731
    assert at(0.125) == pytest.approx(col[0]) and at(0.5) == pytest.approx(col[2])
    assert min(col[1], col[2]) - 1e-12 <= at(0.3) <= max(col[1], col[2]) + 1e-12  # linear between grid points
    # the fit itself on well-separated layer times (measured ones can coincide on a busy machine)
    grid["t"] = [[v] for v in (1e-4, 2e-4, 4e-4, 6e-4, 8e-3)]
    table.fit([({}, {}, 2.0 * table.layer_time({}, {}) + 0.001), ({"layer1.conv1": 0.125}, {},
                                                                  2.0 * (rest + 1e-4) + 0.001)])
    assert (table.a, table.b) == (pytest.approx(0.001, abs=1e-9), pytest.approx(2.0))
