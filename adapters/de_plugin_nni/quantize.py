"""Quantization after pruning with NNI's quantizers, keeping pruned weights exactly zero.

The safe order on nni 3.0 is prune -> (speedup) -> a *fresh* quantizer (ENVIRONMENT.md). A fresh
QAT trains the weights again; to keep pruned weights at exactly zero we mask their gradients
(a zero weight with a zero gradient stays zero under SGD, Adam and AdamW). With symmetric weight
quantization (zero point 0) a zero weight is the integer 0.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Tuple

import torch
from nni.compression.quantization import PtqQuantizer, QATQuantizer
from torch import nn

QUANTIZERS = {"qat": QATQuantizer, "ptq": PtqQuantizer}


@contextmanager
def zeros_kept(model: nn.Module):
    """While active, weights that are exactly zero get zero gradients, so training keeps them zero."""
    handles = []
    for p in model.parameters():
        if p.dim() > 1 and (p == 0).any():
            mask = (p != 0).to(p.dtype)
            handles.append(p.register_hook(lambda g, m=mask: g * m))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def finetune(model: nn.Module, evaluator, epochs: int) -> None:
    """Train a pruned (or sped-up) model with the evaluator's training loop, zeros kept."""
    evaluator.bind_model(model)
    try:
        with zeros_kept(model):
            evaluator.train(max_epochs=epochs)
    finally:
        evaluator.unbind_model()


def quantize(model: nn.Module, name: str, config_list: List[Dict[str, Any]], evaluator, *, steps: int = 100,
             quant_start_step: int = 0) -> Tuple[nn.Module, Dict[str, Any]]:
    """Run NNI's QAT (``qat``) or post-training (``ptq``) quantizer on an already pruned model."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; valid: {', '.join(sorted(QUANTIZERS))}")
    if name == "qat":
        q = QATQuantizer(model, config_list, evaluator, quant_start_step=quant_start_step)
    else:
        q = PtqQuantizer(model, config_list, evaluator)
    # after wrapping: NNI's wrappers hold their own copies of the parameters, hook those
    with zeros_kept(model):
        model, calib = q.compress(max_steps=steps, max_epochs=None)
    q.unwrap_model()
    return model, calib


def integer_weights(model: nn.Module, calib: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The int8 weights NNI's calibration implies: clamp(round(w / scale) + zero_point)."""
    out = {}
    for name, targets in calib.items():
        c = targets.get("weight")
        if not c or c.get("scale") is None:
            continue
        w = model.get_submodule(name).weight.detach()
        qmin, qmax = c.get("quant_min", -127), c.get("quant_max", 127)
        out[name] = torch.clamp(torch.round(w / c["scale"]) + c["zero_point"], qmin, qmax).to(torch.int32)
    return out


def int8_storage(model: nn.Module, calib: Dict[str, Any]) -> Dict[str, int]:
    """Bytes of the quantized weights: dense fp32, dense int8, and sparse int8 (bitmask + values)."""
    ints = integer_weights(model, calib)
    n = sum(t.numel() for t in ints.values())
    nnz = sum(int((t != 0).sum()) for t in ints.values())
    return {"weights": n, "nonzero_int8": nnz, "dense_fp32_bytes": 4 * n, "dense_int8_bytes": n,
            "sparse_int8_bytes": (n + 7) // 8 + nnz}
