"""random_coarse on one torchvision model per family (random weights, small inputs): the coupling
resolves, the masks are exact, the core's slicing gives a smaller model computing the same outputs,
and NNI's speedup route falls back to it where ModelSpeedup cannot follow the graph.

torchvision comes from ``.zoo-site`` (``benchmarks/tvzoo.py`` says why and how; ``.ci/run`` installs it).
"""
import copy
import logging
import sys
from pathlib import Path

import pytest
import torch

import de_plugin
from de_plugin.channels.slicing import speedup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import tvzoo  # noqa: E402

models = tvzoo.import_torchvision()  # not installed: ImportError with the install command, never a skip

#: one model per family the coupling must follow (each a case the coupling once got wrong), with its input size
FAMILIES = {
    "resnet18": 64,              # residual adds
    "regnet_y_400mf": 64,        # grouped convs + squeeze-and-excite
    "resnext50_32x4d": 64,       # grouped convs (32 groups)
    "efficientnet_b0": 64,       # stochastic depth + SE + depthwise
    "mobilenet_v3_small": 64,    # hardswish SE gates
    "convnext_tiny": 64,         # permute to channels-last, LayerNorm, Linear MLP, layer scale
    "swin_t": 64,                # windows (roll, pad, reshape), LayerNorm, Linear MLP
    "vit_b_32": 224,             # patch conv reshaped into tokens, MultiheadAttention
    "densenet121": 64,           # concatenations
    "googlenet": 64,             # inception branches
    "shufflenet_v2_x0_5": 64,    # halves (chunk) and channel shuffle: the stream locked, the branches pruned
    "maxvit_t": 224,             # q / k / v chunk and heads: locked; MBConv, SE and MLPs pruned
    "swin_v2_t": 64,             # the per-head position-bias MLP's output: locked
}


def build(name):
    return tvzoo.build(models, name)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zoo_model_prunes_and_speeds_up_exactly(name):
    torch.set_num_threads(2)
    x = torch.randn(2, 3, FAMILIES[name], FAMILIES[name])
    model = build(name)
    with torch.no_grad():
        r = de_plugin.prune(model, "random_coarse", evaluate=lambda m: float(m(x).std()), feature_map_ratio=0.25,
                            linear_ratio=0.25, candidates=1, adaptive_bn=False, progress=False)
    assert r.extra["groups"] and all(g["kept"] < g["channels"] for g in r.extra["groups"] if g["channels"] >= 4)
    masked = r.model.eval()
    params = dict(masked.named_parameters())
    assert all(not params[n][~m].any() for n, m in r.extra_masks.items() if n in params)
    small = copy.deepcopy(masked)
    info = speedup(small, x, r.extra_masks)
    with torch.no_grad():
        y0, y1 = masked(x), small.eval()(x)
    assert info["params_after"] < 0.95 * info["params_before"]
    assert float((y0 - y1).abs().max() / y0.abs().max()) < 1e-4


def test_nni_speedup_falls_back_to_slicing_where_modelspeedup_fails(caplog):
    pytest.importorskip("nni")
    from de_plugin_nni.tracing import speedup as nni_speedup

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        r = de_plugin.prune(build("convnext_tiny"), "random_coarse", evaluate=lambda m: float(m(x).std()),
                            feature_map_ratio=0.25, linear_ratio=0.25, candidates=1, adaptive_bn=False,
                            progress=False)
    masked = r.model.eval()
    masks = {}
    for k, m in r.extra_masks.items():
        mod, _, p = k.rpartition(".")
        masks.setdefault(mod, {})[p] = m.float()
    small = copy.deepcopy(masked)
    before = sum(p.numel() for p in small.parameters())
    with caplog.at_level(logging.INFO, logger="de_plugin_nni"):
        nni_speedup(small, x, masks)
    with torch.no_grad():
        y0, y1 = masked(x), small(x)
    assert sum(p.numel() for p in small.parameters()) < before
    assert float((y0 - y1).abs().max() / y0.abs().max()) < 1e-4
    # NNI 3.0's ModelSpeedup raises EmptyLayerError on ConvNeXt's channels-last MLPs: the log says so
    assert "ModelSpeedup failed (EmptyLayerError" in caplog.text and "slicing the channels" in caplog.text
