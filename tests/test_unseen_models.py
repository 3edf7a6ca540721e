"""The models of benchmarks/unseen.py: the layers its docstring names are what the pruners find and prune; the
equal-evaluations control gets the default's own spend as its budget."""
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


def test_equal_evaluations_control_gets_the_defaults_spend(tmp_path, monkeypatch):
    """The control runs after the default's cell of the same seed and rung, with ``max_evals`` = the evaluations
    the default spent there (not DE's nominal budget, which its stall stop leaves mostly unspent)."""
    calls = []

    def fake_cell(dense, data, method, sparsity, seed, max_evals=None, finalist_bn=None):
        calls.append((method, sparsity, max_evals))
        assert finalist_bn == "re-estimated"  # the default, for every cell
        return {"test": 0.5, "nfev": 300 + int(100 * sparsity) if max_evals is None else max_evals,
                "wall_seconds": 0.0, "chosen": [None]}

    monkeypatch.setattr(unseen, "run_cell", fake_cell)
    monkeypatch.setattr(unseen, "dense_model", lambda data, seed, name: torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval())
    monkeypatch.setattr(unseen, "plot", lambda *a, **k: None)
    unseen.main(["--seeds", "0", "--sparsities", "0.8", "0.9", "--methods", unseen.EQUAL_RANDOM,
                 "--out", str(tmp_path)])
    assert calls == [("de_layerwise", 0.8, None), (unseen.EQUAL_RANDOM, 0.8, 380),
                     ("de_layerwise", 0.9, None), (unseen.EQUAL_RANDOM, 0.9, 390)]
