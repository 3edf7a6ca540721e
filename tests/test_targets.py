import pytest
import torch
from torch import nn

from de_plugin.targets import apply_masks, attach_masks, detach_masks, find_targets, masks_attached


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x: (B, 1, 4, 4) -> conv (B, 4, 2, 2) -> seq of 4 x 4... reshape to (B, 2, 8)
        h = self.bn(self.conv(x)).reshape(x.shape[0], 2, 8)
        out, _ = self.lstm(h)
        return self.head(torch.relu(self.fc(out[:, -1])))


def test_default_targets_include_conv_linear_and_recurrent():
    names = [t.name for t in find_targets(Net())]
    assert names == ["conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "fc.weight", "head.weight"]


def test_selection_by_name_type_and_exclude():
    m = Net()
    assert [t.name for t in find_targets(m, layer_types=["Linear"])] == ["fc.weight", "head.weight"]
    assert [t.name for t in find_targets(m, exclude=["head", "lstm"])] == ["conv.weight", "fc.weight"]
    assert [t.name for t in find_targets(m, layers=["f*"])] == ["fc.weight"]


def test_selection_errors():
    with pytest.raises(ValueError, match="matches no module"):
        find_targets(Net(), exclude=["classifier"])
    with pytest.raises(ValueError, match="unknown layer_types"):
        find_targets(Net(), layer_types=["Dense"])
    with pytest.raises(ValueError, match="no prunable layer"):
        find_targets(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_masks_hold_during_training_including_lstm():
    torch.manual_seed(0)
    m = Net()
    targets = find_targets(m)
    masks = {t.name: torch.rand(t.shape) > 0.5 for t in targets}
    opt_params = None
    with masks_attached(m, targets, masks):
        opt_params = list(m.parameters())
        opt = torch.optim.SGD(opt_params, lr=0.5)
        for _ in range(5):
            opt.zero_grad()
            m(torch.randn(4, 1, 4, 4)).sum().backward()
            opt.step()
        # the weights seen by forward are masked
        assert torch.all(m.lstm.weight_hh_l0[~masks["lstm.weight_hh_l0"]] == 0)
    for t in targets:
        w = dict(m.named_parameters())[t.name]
        assert torch.all(w[~masks[t.name]] == 0)
        assert w[masks[t.name]].abs().sum() > 0
    assert "conv.weight" in dict(m.named_parameters())  # plain parameters again, no hooks left
    assert not any(m.conv._forward_pre_hooks)


def test_straight_through_gives_gradient_to_masked_weights():
    lin = nn.Linear(4, 2)
    targets = find_targets(lin)
    mask = torch.tensor([[True, False, True, False], [False, True, False, True]])
    attach_masks(lin, targets, {"weight": mask}, straight_through=True)
    out = lin(torch.ones(1, 4)).sum()
    out.backward()
    assert torch.all(lin.weight_orig.grad != 0)  # every entry receives a gradient
    assert torch.all(lin.weight[~mask] == 0)  # but the forward used masked weights
    detach_masks(lin, targets)
    attach_masks(lin, targets, {"weight": mask}, straight_through=False)
    lin.weight_orig.grad = None
    lin(torch.ones(1, 4)).sum().backward()
    assert torch.all(lin.weight_orig.grad[~mask] == 0)


def test_apply_masks_zeroes_exactly_the_masked_entries():
    torch.manual_seed(0)
    m = Net()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = {"fc.weight": torch.rand(3, 6) > 0.5, "lstm.weight_hh_l0": torch.rand(24, 6) > 0.5}
    apply_masks(m, masks)
    for name, p in m.named_parameters():
        mask = masks.get(name)
        expected = before[name] if mask is None else before[name] * mask
        assert torch.equal(p.detach(), expected), name
    # while a mask container is attached, the live weight (fc.weight_orig) is what gets masked
    targets = [t for t in find_targets(m) if t.name == "head.weight"]
    keep = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    with masks_attached(m, targets, {"head.weight": torch.ones(2, 3)}):
        apply_masks(m, {"head.weight": keep})
    assert torch.equal(m.head.weight.detach() == 0, keep == 0)


def test_apply_masks_refuses_unknown_names_and_shapes_unless_told():
    m = Net()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(KeyError, match="no tensor 'fc.wieght'"):
        apply_masks(m, {"fc.wieght": torch.ones(3, 6)})
    with pytest.raises(ValueError, match=r"shape \(6, 3\), the tensor \(3, 6\)"):
        apply_masks(m, {"fc.weight": torch.zeros(6, 3)})
    apply_masks(m, {"fc.wieght": torch.zeros(3, 6), "fc.weight": torch.zeros(6, 3)}, strict=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
