"""torchvision for the zoo test and benchmark only, from ``.zoo-site`` (never on the plugin's path).

Two quirks of our stack (torch 2.13.0+cpu, torchvision 0.28.0), kept out of the plugin:

1. torchvision 0.28's wheel ships CUDA-built ``_C`` ops that do not register against the CPU torch:
   ``import torchvision`` fails with ``RuntimeError: operator torchvision::nms does not exist``.
   Classification models need none of those ops, so the two registration modules are replaced by
   empty ones before the import.
2. For the same reason torchvision must not sit in site-packages: torchmetrics (imported by
   pytorch-lightning, imported by NNI) imports torchvision whenever it is installed, and NNI's import
   then fails with the error above. ``.ci/run`` installs torchvision (and Torch-Pruning, the peer the
   benchmark compares with) with ``pip install --no-deps --target .zoo-site``; this module puts that
   folder on ``sys.path``.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

SITE = Path(__file__).resolve().parent.parent / ".zoo-site"
INSTALL = ('python -m pip install --no-deps --target .zoo-site "torchvision==0.28.0" "torch-pruning==1.6.1" '
           '(what .ci/run does)')


def import_torchvision():
    """``torchvision.models`` with the shim, or ImportError saying how to install it."""
    if SITE.is_dir() and str(SITE) not in sys.path:
        sys.path.append(str(SITE))
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        from torchvision import models
    except ImportError as exc:
        raise ImportError(f"torchvision is not installed for the zoo: {INSTALL}") from exc
    return models


def build(models, name: str):
    """A torchvision classifier as the zoo test and benchmark use it: random weights (seed 0), 10 classes,
    eval mode, with initialisations that would hide pruning in the outputs made visible."""
    import torch

    kw: dict = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=False)
    torch.manual_seed(0)
    model = models.get_model(name, weights=None, **kw).eval()
    for mod in model.modules():
        if isinstance(getattr(mod, "layer_scale", None), torch.nn.Parameter):  # ConvNeXt: 1e-6 hides its blocks
            torch.nn.init.constant_(mod.layer_scale, 0.5)
        if isinstance(mod, torch.nn.Linear) and not mod.weight.any():  # ViT's zero-initialised head: outputs 0
            torch.nn.init.normal_(mod.weight, std=0.02)
    return model
