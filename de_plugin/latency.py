"""Measured latency of a model on this machine: what a deployer's budget is about.

MACs and parameters are proxies; the issue that asked for channel pruning asked for real speed. A
model's latency is the median of repeated timed forward passes (after warm-up runs, in inference
mode, on the device and thread count the caller set), at a given batch size built by repeating the
example input.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def batch_of(example: Any, batch: int) -> Any:
    """``example`` (a tensor or tuple of tensors, any batch size) repeated to ``batch`` samples."""
    if isinstance(example, tuple):
        return tuple(batch_of(t, batch) for t in example)
    if not isinstance(example, torch.Tensor):
        return example
    reps = -(-batch // example.shape[0])
    return example.repeat(reps, *[1] * (example.dim() - 1))[:batch]


def measure(model: nn.Module, example: Any, batch: int = 1, repeats: int = 30, warmup: int = 3) -> float:
    """Median seconds of one forward pass of ``batch`` samples (the model is left in its mode)."""
    x = batch_of(example, batch)
    args = x if isinstance(x, tuple) else (x,)
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(*args)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(*args)
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    return statistics.median(times)
