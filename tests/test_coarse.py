"""random_coarse / l1_filter in the core: coupling, exact masks, adaptive BN, MACs, bad input."""
import copy

import pytest
import torch
from torch import nn

import de_plugin
from conftest import same_state, state_of
from de_plugin.channels.coarse import CoarseOptions, CoarseSpace, best_of_n, count_macs, recalibrate_bn
from de_plugin.channels.coupling import CouplingError, channel_groups
from de_plugin.demo.models import LeNet5, SmallResNet
from de_plugin.demo.training import make_evaluate, make_finetune


@pytest.fixture
def ev(images):
    return make_evaluate(images.xv, images.yv)


@pytest.fixture
def ft(images):
    return make_finetune(images.x, images.y, lr=1e-3, batch_size=64)


def by_producers(groups):
    return {tuple(sorted(g.producers)): g for g in groups}


def test_coupling_follows_residual_adds_and_flatten():
    groups = by_producers(channel_groups(SmallResNet(widths=(8, 16, 16)), torch.randn(2, 1, 8, 8)))
    assert set(groups) == {("layer1.conv2", "stem.0"), ("layer1.conv1",), ("layer2.conv1",),
                           ("layer2.conv2", "layer2.shortcut.0"), ("layer3.conv1",), ("layer3.conv2", "layer3.shortcut.0"),
                           ("fc",)}
    assert groups[("fc",)].locked == "reaches the model output"  # a Linear's outputs are a group too
    stem = groups[("layer1.conv2", "stem.0")]
    assert sorted(stem.batchnorms) == [("layer1.bn2", 0), ("stem.1", 0)]
    assert sorted(c[0] for c in stem.consumers) == ["layer1.conv1", "layer2.conv1", "layer2.shortcut.0"]
    lenet = by_producers(channel_groups(LeNet5(), torch.randn(2, 1, 28, 28)))
    assert lenet[("conv2",)].consumers == [("fc1", 0, 16)]  # 50 maps of 4x4 flattened into fc1


class CatDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        y = self.bn(self.dw(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


def test_concat_offsets_and_depthwise_pass_through():
    groups = by_producers(channel_groups(CatDepthwise(), torch.randn(2, 1, 8, 8)))
    assert groups[("a",)].consumers == [("head", 0, 1)] and groups[("b",)].consumers == [("head", 4, 1)]
    assert groups[("b",)].depthwise == [("dw", 4)] and groups[("b",)].batchnorms == [("bn", 4)]
    model = CatDepthwise()
    space = CoarseSpace(model, torch.randn(2, 1, 8, 8), ["a", "b", "head"], CoarseOptions(feature_map_ratio=0.5))
    cand = space.sample(__import__("numpy").random.default_rng(0))
    masks = space.masks(cand)
    removed_b = (~torch.from_numpy(cand["channels"][[g.producers for g in space.groups].index(["b"])])).nonzero().flatten()
    assert not masks["head.weight"][:, 4 + removed_b].any()  # b's maps sit after a's 4 in the concatenation
    assert not masks["dw.weight"][4 + removed_b].any() and not masks["bn.bias"][4 + removed_b].any()
    assert int((~masks["bn.weight"]).sum()) == 2 + 3  # half of a's 4 and of b's 6


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.roll(self.c1(x), 1, dims=1))).mean((2, 3)))


def test_unresolvable_coupling_names_the_op_and_leaves_model_untouched(images):
    model = Rolled()
    before = state_of(model)
    ev = lambda m: float(m(images.xv).mean().detach())  # noqa: E731
    with pytest.raises(CouplingError, match="roll"):
        de_plugin.prune(model, "random_coarse", evaluate=ev, feature_map_ratio=0.5, candidates=2, inplace=True)
    assert same_state(before, state_of(model))
    # excluding the layer that feeds the op is the documented way out
    r = de_plugin.prune(model, "random_coarse", evaluate=ev, feature_map_ratio=0.5, candidates=2, exclude=["c1"],
                        progress=False)
    assert [g["layers"] for g in r.extra["groups"]] == [["c2"]]


def test_random_coarse_is_one_stepped_round(resnet, images, ev, ft):
    """Through the shared round loop: one step (search, retrain), its record in the history, the masks of
    ``prune``; a second step is refused."""
    from de_plugin.adapter import Context, create_pruner
    from de_plugin.targets import find_targets

    opts = dict(feature_map_ratio=0.5, candidates=3, bn_batches=2)
    whole = de_plugin.prune(copy.deepcopy(resnet), "random_coarse", evaluate=ev, finetune=ft, progress=False,
                            train_data=images.batches, **opts)
    model = copy.deepcopy(resnet)
    runner = create_pruner("random_coarse", **opts).runner()
    runner.start(Context(model=model, targets=find_targets(model), evaluate=ev, finetune=ft, sparsity=None,
                         max_accuracy_drop=None, seed=0, progress=False, train_batches=list(images.batches)))
    record = runner.step()
    assert runner.done and record["candidate_scores"] == whole.extra["candidate_scores"]
    with pytest.raises(RuntimeError, match="finished"):
        runner.step()
    out = runner.finish()
    assert [h["round"] for h in whole.history] == [0] and out.accuracy == whole.accuracy
    assert all(torch.equal(out.extra_masks[k], whole.extra_masks[k]) for k in whole.extra_masks)


def test_masks_exact_coupled_and_zero_after_retraining(resnet, images, ev, ft):
    r = de_plugin.prune(resnet, "random_coarse", evaluate=ev, finetune=ft, train_data=images.batches,
                        feature_map_ratio=0.5, kernel_ratio=0.25, candidates=4, bn_batches=3, progress=False)
    m = r.model
    groups = {tuple(g["layers"]): g for g in r.extra["groups"]}
    assert all(g["kept"] == g["channels"] - round(0.5 * g["channels"]) for g in groups.values())
    pm = r.extra_masks
    # coupled producers lose the same channels; their BatchNorms too; the masked entries are zero
    ch = lambda bn: pm[bn + ".weight"]  # noqa: E731 - kept feature maps, read off the BatchNorm masks
    assert torch.equal(ch("stem.1"), ch("layer1.bn2")) and torch.equal(ch("layer2.bn2"), ch("layer2.shortcut.1"))
    for conv, bn in (("stem.0", "stem.1"), ("layer1.conv2", "layer1.bn2"), ("layer2.shortcut.0", "layer2.shortcut.1")):
        assert not pm[conv + ".weight"][~ch(bn)].any() and torch.equal(pm[bn + ".bias"], ch(bn))
    params = dict(m.named_parameters())
    for name, mask in pm.items():
        assert not params[name][~mask].any(), name
    # consumers' input columns of removed maps are zero (layer1.conv1 consumes the stem's maps)
    assert not params["layer1.conv1.weight"][:, ~ch("stem.1")].any()
    # kernel granularity: a quarter of the kernels alive after feature-map pruning, removed
    w = pm["layer2.conv1.weight"]
    alive = torch.outer(ch("layer2.bn1"), ch("stem.1"))
    assert int(w.flatten(2).any(2).sum()) == int(alive.sum()) - round(0.25 * int(alive.sum()))
    assert r.extra["macs"] < r.extra["macs_dense"] and 0 < r.extra["macs_kept"] < 1
    assert r.layer_sparsity["fc.weight"] == pytest.approx(0.5)  # fc consumes the last coupled group


def test_best_of_n_restores_model_scores_are_reproducible_and_no_copies(resnet, images, ev, monkeypatch):
    opts = CoarseOptions(feature_map_ratio=0.5, candidates=6, bn_batches=3)
    space = CoarseSpace(resnet, images.xv[:2], [n for n, x in resnet.named_modules() if isinstance(x, nn.Conv2d)], opts)
    before = state_of(resnet)

    def no_copy(*a, **k):
        raise AssertionError("best_of_n must not copy the model")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    best, best_score, scores = best_of_n(resnet, space, ev, opts, seed=3, calib=images.batches, progress=False)
    monkeypatch.undo()
    assert same_state(before, state_of(resnet))  # weights and BN statistics put back
    assert len(scores) == 6 and best_score == max(scores) and len(set(scores)) > 1
    _, _, again = best_of_n(resnet, space, ev, opts, seed=3, calib=images.batches, progress=False)
    assert again == scores  # same seed, same candidates, same scores
    # the best score is what that mask scores on its own, after adaptive BN
    with torch.no_grad():
        for n, mk in space.masks(best).items():
            space.param(n).mul_(mk)
    recalibrate_bn(resnet, images.batches, 3)
    assert ev(resnet) == best_score


def test_adaptive_bn_re_estimates_statistics_from_training_batches(resnet, images):
    seen = []
    resnet.eval()
    h = resnet.stem[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    recalibrate_bn(resnet, images.batches, 2)
    h.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(resnet.stem[1].running_mean, x.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert not resnet.stem[1].training and resnet.stem[1].momentum == 0.1  # modes and momentum put back


def test_adaptive_bn_is_on_for_bn_models_and_changes_scores(resnet, images, ev):
    kw = dict(evaluate=ev, feature_map_ratio=0.5, candidates=3, bn_batches=3, progress=False, seed=1)
    with pytest.raises(ValueError, match="train_data"):
        de_plugin.prune(resnet, "random_coarse", **kw)
    on = de_plugin.prune(resnet, "random_coarse", train_data=images.batches, **kw)
    off = de_plugin.prune(resnet, "random_coarse", adaptive_bn=False, **kw)
    assert on.extra["adaptive_bn"] and not off.extra["adaptive_bn"]
    assert on.extra["candidate_scores"] != off.extra["candidate_scores"]


def test_l1_filter_keeps_the_largest_filters(images):
    torch.manual_seed(0)
    model = LeNet5()
    x = torch.randn(64, 1, 28, 28)
    ev = lambda m: float(m(x).std())  # noqa: E731
    r = de_plugin.prune(model, "l1_filter", evaluate=ev, feature_map_ratio=0.4, progress=False)
    norms = model.conv1.weight.detach().abs().flatten(1).sum(1)
    kept = r.masks["conv1.weight"].flatten(1).any(1)
    assert int(kept.sum()) == 12 and norms[kept].min() >= norms[~kept].max()
    assert r.nfev == 1


def test_macs_of_masks_equal_macs_of_the_physically_smaller_model():
    torch.manual_seed(0)
    model = LeNet5()
    x = torch.randn(2, 1, 28, 28)
    r = de_plugin.prune(model, "random_coarse", evaluate=lambda m: float(m(x).sum()), feature_map_ratio=0.5,
                        candidates=2, progress=False, adaptive_bn=False)
    keep1 = r.masks["conv1.weight"].flatten(1).any(1)
    keep2 = r.masks["conv2.weight"].flatten(1).any(1)
    small = LeNet5()
    small.conv1 = nn.Conv2d(1, int(keep1.sum()), 5)
    small.conv2 = nn.Conv2d(int(keep1.sum()), int(keep2.sum()), 5)
    small.fc1 = nn.Linear(int(keep2.sum()) * 16, 500)
    assert r.extra["macs"] == count_macs(small, x)["macs_dense"]
    # and the masked model computes what the sliced one computes
    with torch.no_grad():
        small.conv1.weight.copy_(r.model.conv1.weight[keep1])
        small.conv1.bias.copy_(r.model.conv1.bias[keep1])
        small.conv2.weight.copy_(r.model.conv2.weight[keep2][:, keep1])
        small.conv2.bias.copy_(r.model.conv2.bias[keep2])
        small.fc1.weight.copy_(r.model.fc1.weight.view(500, 50, 16)[:, keep2].flatten(1))
        small.fc1.bias.copy_(r.model.fc1.bias)
        small.fc2.load_state_dict(r.model.fc2.state_dict())
    torch.testing.assert_close(small(x), r.model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"feature_map_ratio": 1.0}, ValueError, "feature_map_ratio"),
    ({"feature_map_ratio": -0.1}, ValueError, "feature_map_ratio"),
    ({"feature_map_ratio": 0.97}, ValueError, "every one of the 8 channels"),
    ({"ratios": {"stem.0": 1.5}}, ValueError, "must lie in"),
    ({"ratios": {"stem.0": 0.3, "layer1.conv2": 0.5}}, ValueError, "share channels"),
    ({"candidates": 0}, ValueError, "candidates"),
    ({"sparsity": 0.5}, ValueError, "ratio options"),
    ({"candidate": 5}, ValueError, "did you mean 'candidates'"),
    ({"layer_types": ["Linear"]}, ValueError, "no Conv2d"),
])
def test_bad_input_clear_errors_model_untouched(resnet, images, ev, kwargs, exc, match):
    before = state_of(resnet)
    with pytest.raises(exc, match=match):
        de_plugin.prune(resnet, "random_coarse", evaluate=ev, train_data=images.batches, inplace=True,
                        progress=False, **kwargs)
    assert same_state(before, state_of(resnet))


def test_save_and_load_reapply_every_mask(resnet, images, ev, tmp_path):
    r = de_plugin.prune(resnet, "random_coarse", evaluate=ev, train_data=images.batches, candidates=2, bn_batches=2,
                        progress=False)
    r.save(tmp_path / "m.pt")
    fresh = de_plugin.load(tmp_path / "m.pt", copy.deepcopy(resnet))
    for name, mask in r.extra_masks.items():
        assert not dict(fresh.named_parameters())[name][~mask].any()
    assert "macs_kept" in r.to_json() and "random_coarse" in de_plugin.list_pruners() \
        and "l1_filter" in de_plugin.list_pruners()


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_workers_score_the_serial_candidates_bit_for_bit(resnet, images, ev, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as each worker
    try:
        kw = dict(evaluate=ev, train_data=images.batches, feature_map_ratio=0.5, kernel_ratio=0.2, candidates=6,
                  bn_batches=3, finetune_epochs=0, progress=False, seed=5)
        serial = de_plugin.prune(resnet, "random_coarse", **kw)
        par = de_plugin.prune(resnet, "random_coarse", backend=backend, workers=2, **kw)
    finally:
        torch.set_num_threads(n)
    assert serial.extra["candidate_scores"] == par.extra["candidate_scores"]
    assert len(set(serial.extra["candidate_scores"])) > 1  # real, different evaluations
    assert serial.masks.keys() == par.masks.keys() and all(torch.equal(serial.masks[k], par.masks[k]) for k in serial.masks)


def test_batched_backend_is_refused_for_random_coarse(resnet, images, ev):
    with pytest.raises(ValueError, match="backend"):
        de_plugin.prune(resnet, "random_coarse", evaluate=ev, train_data=images.batches, backend="batched",
                        progress=False)
