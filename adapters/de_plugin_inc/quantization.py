"""INC quantization after pruning: post-training (static / dynamic) through the 2.x API.

On torch 2.13 the 2.x ``neural_compressor.quantization.fit`` with ``PostTrainingQuantConfig`` works;
the 3.x ``StaticQuantConfig``/``DynamicQuantConfig`` do not (torchao move), and GPTQ rewrites
pruned zeros (ENVIRONMENT.md). INC quantizes weights per channel and symmetrically, so a pruned
weight is the integer 0, which :func:`int8_weights` lets a test check.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn


def quantize(model: nn.Module, approach: str = "static", calib_dataloader: Optional[Iterable] = None,
             eval_func: Optional[Callable[[nn.Module], float]] = None, workspace: str = "runs/inc"):
    """INC post-training quantization; returns INC's quantized model (``.model`` is the torch module).

    INC writes its tuning history under ``workspace``/nc_workspace (INC's default is ``./nc_workspace``
    in whatever directory the user runs from)."""
    import os

    from neural_compressor import PostTrainingQuantConfig
    from neural_compressor.config import options
    from neural_compressor.quantization import fit

    options.workspace = os.path.join(workspace, "nc_workspace", "")

    if approach not in ("static", "dynamic"):
        raise ValueError(f"approach must be 'static' or 'dynamic', got {approach!r}")
    if approach == "static" and calib_dataloader is None:
        raise ValueError("static quantization needs calib_dataloader (a few batches of inputs)")
    conf = PostTrainingQuantConfig(approach=approach)
    q = fit(model, conf, calib_dataloader=calib_dataloader, eval_func=eval_func)
    if q is None:
        raise RuntimeError("INC quantization found no configuration meeting its accuracy criterion")
    return q


def int8_weights(qmodel) -> Dict[str, torch.Tensor]:
    """Integer weights of every quantized Linear/Conv in a model INC returned."""
    module = getattr(qmodel, "model", qmodel)
    out = {}
    for name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if callable(w):  # torch.ao quantized modules expose weight() -> quantized tensor
            try:
                t = w()
            except Exception:  # noqa: BLE001 - not a packed quantized module
                continue
            if hasattr(t, "int_repr"):
                out[name] = t.int_repr()
    return out
