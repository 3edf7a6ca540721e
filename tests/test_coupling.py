"""The coupling pass on the graph shapes of real architectures (grouped convs, channels-last blocks,
token reshapes, per-channel parameters) and the core's slicing speedup: exact, smaller, clear refusals."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import de_plugin
from conftest import same_state, state_of
from de_plugin.channels.coarse import CoarseOptions, CoarseSpace
from de_plugin.channels.coupling import CouplingError, channel_groups
from de_plugin.channels.slicing import speedup


def by_producers(groups):
    return {tuple(sorted(g.producers)): g for g in groups}


def score(x):
    return lambda m: float(m(x).detach().std())


def prune_and_speedup(model, x, **options):
    """random_coarse (one candidate, no retraining), then the slicing; returns both models' outputs."""
    r = de_plugin.prune(model, "random_coarse", evaluate=score(x), candidates=1, adaptive_bn=False, progress=False,
                        **options)
    masked = r.model.eval()
    small = copy.deepcopy(masked)
    info = speedup(small, x, r.extra_masks)
    with torch.no_grad():
        return r, small, masked(x), small.eval()(x), info


class Grouped(nn.Module):
    """ResNeXt / RegNet bottleneck: 1x1, grouped 3x3 (4 groups of 4), 1x1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn_b = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return self.fc(self.c(y).mean((2, 3)))


def randomize_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def test_grouped_conv_removes_channels_evenly_per_group_and_speeds_up_exactly():
    x = torch.randn(2, 3, 8, 8)
    g = by_producers(channel_groups(Grouped(), x))[("a",)]
    assert g.grouped == [("b", 0)] and g.block == 4 and not g.unresolved and not g.locked
    model = randomize_bn(Grouped())
    r, small, y0, y1, info = prune_and_speedup(model, x, feature_map_ratio=0.5)
    keep = r.extra_masks["a.weight"].flatten(1).any(1).reshape(4, 4)
    assert keep.sum(1).tolist() == [2, 2, 2, 2]  # two of each conv group's four channels
    assert small.b.groups == 4 and small.b.in_channels == small.b.out_channels == 8 and small.b.weight.shape[1] == 2
    assert info["params_after"] < info["params_before"]
    assert torch.allclose(y0, y1, atol=1e-5)


def test_a_ratio_that_empties_the_groups_of_a_grouped_conv_is_refused_before_any_work():
    model = Grouped()
    before = state_of(model)
    with pytest.raises(ValueError, match="every group of the grouped conv"):
        de_plugin.prune(model, "random_coarse", evaluate=score(torch.randn(2, 3, 8, 8)), feature_map_ratio=0.9,
                        candidates=1, adaptive_bn=False, inplace=True, progress=False)
    assert same_state(before, state_of(model))


class ChannelsLast(nn.Module):
    """A ConvNeXt block: depthwise conv, permute to channels-last, LayerNorm, Linear MLP, layer scale."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(nn.functional.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)
        return self.head((x + self.layer_scale * y).mean((2, 3)))


def test_channels_last_blocks_lock_layernormed_channels_and_prune_mlp_hidden_units():
    x = torch.randn(2, 3, 8, 8)
    groups = by_producers(channel_groups(ChannelsLast(), x))
    stream = groups[("down", "stem")]
    assert stream.locked and "LayerNorm" in stream.locked  # statistics over the channels: never shrunk
    assert ("layer_scale", 0, 0) in stream.params and stream.depthwise == [("dw", 0)]
    hidden = groups[("up",)]
    assert hidden.consumers == [("down", 0, 1)] and not hidden.locked and not hidden.unresolved
    r, small, y0, y1, _ = prune_and_speedup(ChannelsLast(), x, feature_map_ratio=0.5, linear_ratio=0.5)
    assert [g["layers"] for g in r.extra["groups"]] == [["up"]]
    assert small.up.out_features == 16 and small.down.in_features == 16
    assert torch.allclose(y0, y1, atol=1e-5)


class Tokens(nn.Module):
    """A ViT stem and MLP: patch conv, flatten to tokens, transpose, Linear MLP over the embedding."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t[:, 0])


def test_token_reshape_maps_conv_channels_to_the_embedding():
    x = torch.randn(2, 3, 8, 8)
    groups = by_producers(channel_groups(Tokens(), x))
    emb = groups[("fc2", "patch")]
    assert not emb.unresolved and sorted(emb.consumers) == [("fc1", 0, 1), ("head", 0, 1)]
    assert emb.locked is None  # the embedding is prunable here: no LayerNorm over it
    r, small, y0, y1, _ = prune_and_speedup(Tokens(), x, feature_map_ratio=0.5, linear_ratio=0.5)
    assert small.patch.out_channels == 4 and small.fc1.in_features == 4 and small.head.in_features == 4
    assert small.fc1.out_features == 8
    assert torch.allclose(y0, y1, atol=1e-5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.c(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = -y
        return self.fc(y.mean((2, 3)))


def test_an_untraceable_model_is_refused_with_the_line_that_fails():
    model = Untraceable()
    before = state_of(model)
    with pytest.raises(CouplingError, match=r"test_coupling.py:\d+ in forward: if y.sum\(\) > 0"):
        de_plugin.prune(model, "random_coarse", evaluate=score(torch.randn(2, 3, 8, 8)), feature_map_ratio=0.5,
                        candidates=1, adaptive_bn=False, inplace=True, progress=False)
    assert same_state(before, state_of(model))


def test_linear_hidden_units_are_pruned_only_when_asked():
    x = torch.randn(2, 3, 8, 8)
    space = CoarseSpace(Tokens(), x, ["patch", "fc1", "fc2", "head"], CoarseOptions(feature_map_ratio=0.5))
    assert [g.producers for g in space.groups] == [["patch", "fc2"]]  # linear_ratio=0: only conv maps
    space = CoarseSpace(Tokens(), x, ["patch", "fc1", "fc2", "head"], CoarseOptions(feature_map_ratio=0.5,
                                                                                     linear_ratio=0.25))
    cand = space.sample(np.random.default_rng(0))
    assert {tuple(g.producers): int((~k).sum()) for g, k in zip(space.groups, cand["channels"])} == {
        ("patch", "fc2"): 4, ("fc1",): 4}


class Unfollowed(nn.Module):
    """A cumulative sum across channels (an op the pass cannot follow) between two convs, then a prunable pair."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.cumsum(self.a(x), dim=1)
        return self.fc(self.c(torch.relu(self.b(y))).mean((2, 3)))


def test_unresolved_groups_are_named_in_one_error_or_skipped_on_request():
    x = torch.randn(2, 3, 8, 8)
    model = Unfollowed()
    before = state_of(model)
    with pytest.raises(CouplingError, match=r"cumsum.*exclude=\['a'\].*unresolved='skip'"):
        de_plugin.prune(model, "random_coarse", evaluate=score(x), feature_map_ratio=0.5, candidates=1,
                        inplace=True, progress=False)
    assert same_state(before, state_of(model))
    r, small, y0, y1, _ = prune_and_speedup(Unfollowed(), x, feature_map_ratio=0.5, unresolved="skip")
    assert [g["layers"] for g in r.extra["groups"]] == [["b"], ["c"]]  # a's maps are left as they are
    assert small.a.out_channels == 8 and small.b.out_channels == 4
    assert torch.allclose(y0, y1, atol=1e-5)


class ShuffleBlocks(nn.Module):
    """Two ShuffleNetV2 units (torchvision's code): split in halves, one half through 1x1 / depthwise / 1x1,
    concatenated with the other, channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
                                                 nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6),
                                                 nn.Conv2d(6, 4, 1), nn.ReLU()) for _ in range(2))
        self.head = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 2)

    @staticmethod
    def shuffle(x, groups=2):
        n, c, h, w = x.size()
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)

    def forward(self, x):
        y = self.stem(x)
        for unit in self.units:
            a, b = y.chunk(2, dim=1)
            y = self.shuffle(torch.cat((a, unit(b)), dim=1))
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


def test_channel_shuffle_and_halves_lock_the_stream_and_the_branches_prune_by_default():
    """ShuffleNetV2's split and shuffle: the channels that pass through them are locked, each with the reason
    (a removal would have to be mirrored at aligned positions of every part), the branch-internal and head
    channels prune by default (unresolved='raise') and the sliced model computes the same outputs."""
    x = torch.randn(2, 3, 8, 8)
    groups = by_producers(channel_groups(ShuffleBlocks().eval(), x))
    assert not any(g.unresolved for g in groups.values())
    assert "split along its channels by call_method chunk" in groups[("stem",)].locked
    assert "divided into parts by call_method view" in groups[("units.0.5",)].locked
    assert "divided into parts" in groups[("units.1.5",)].locked
    free = sorted(k for k, g in groups.items() if not g.locked)
    assert free == [("head",), ("units.0.0",), ("units.1.0",)]
    r, small, y0, y1, info = prune_and_speedup(ShuffleBlocks(), x, feature_map_ratio=0.5)
    assert small.units[0][0].out_channels == small.units[0][3].out_channels == 3 and small.head.out_channels == 3
    assert small.stem.out_channels == 8
    assert info["params_after"] < info["params_before"]
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)


class SplitsAndJoins(nn.Module):
    """Halves along a spatial axis added back (the channels are the same in both), and the model input
    concatenated with a conv's maps along the channels (DenseNet-style, the input itself untracked)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(11, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        top, bottom = self.a(x).chunk(2, dim=2)
        y = torch.relu(torch.cat((top + bottom, x[:, :, :4]), dim=1))
        return self.fc(self.b(y).mean((2, 3)))


def test_a_split_along_another_axis_keeps_the_channels_and_untracked_channels_concatenated_stay():
    x = torch.randn(2, 3, 8, 8)
    groups = by_producers(channel_groups(SplitsAndJoins().eval(), x))
    assert not groups[("a",)].locked and not groups[("a",)].unresolved
    assert groups[("a",)].consumers == [("b", 0, 1)]  # the model input's 3 channels follow at columns 8-10
    r, small, y0, y1, _ = prune_and_speedup(SplitsAndJoins(), x, feature_map_ratio=0.5)
    assert small.a.out_channels == 4 and small.b.in_channels == 4 + 3
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
