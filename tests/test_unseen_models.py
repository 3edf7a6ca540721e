"""The models of benchmarks/unseen.py: the layers its docstring names are what the pruners find and prune."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import unseen  # noqa: E402

from de_plugin.targets import find_targets  # noqa: E402


@pytest.mark.parametrize("name,layers", [("resnet", 22), ("vit", 26), ("mobilenet", 23)])
def test_prunable_layers_and_output_shape(name, layers):
    model = unseen.MODELS[name][0]()
    targets = find_targets(model)
    assert len(targets) == layers
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_vit_attention_uses_every_projection():
    """Zeroing q changes the output (the projections are wired into the attention, not left unused)."""
    torch.manual_seed(0)
    model = unseen.DigitsViT().eval()
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    with torch.no_grad():
        model.blocks[0].attn.q.weight.zero_()
        model.blocks[0].attn.q.bias.zero_()
    assert not torch.allclose(before, model(x))


def test_mobilenet_has_seven_depthwise_targets():
    """The 7 depthwise convolutions the docstring names are among the targets (one per inverted-residual block)."""
    model = unseen.DigitsMobileNet()
    modules = dict(model.named_modules())
    convs = [modules[t.module_name] for t in find_targets(model) if t.module_type == "Conv2d"]
    assert sum(c.groups > 1 and c.groups == c.in_channels for c in convs) == 7
