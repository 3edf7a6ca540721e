"""Measured latency of a model on this machine: what a deployer's budget is about.

MACs and parameters are proxies; what a deployer budgets is time on their machine. A
model's latency is the median of repeated timed forward passes (after warm-up runs, in inference
mode, on the device and thread count the caller set), at a given batch size built by repeating the
example input.
"""
from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
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


GRID = (0.125, 0.25, 0.5, 0.75, 1.0)


class LatencyTable:
    """Per-layer latency of the Conv2d / Linear layers at a grid of kept input / output channel shares.

    Each layer is rebuilt at each grid point (a fresh layer with that many channels, random weights,
    on an input of the shape it sees in the model) and timed alone, and an allocation's layer time is
    read off by bilinear interpolation. What the layers alone do not show (BatchNorm, activations and
    adds, which shrink with the channels, and per-op overhead, which does not) is fitted on whole
    sliced models: :meth:`fit` takes measured latencies of a few allocations and sets
    ``latency = a + b * (sum of interpolated layer times)`` by least squares. Tables and fits are
    cached per model structure, batch size, thread count and torch version (``cache`` folder), since
    timing is the slow part.
    """

    def __init__(self, model: nn.Module, example: Any, prunable: dict[str, tuple[bool, bool]], batch: int,
                 cache: Optional[str] = None, repeats: int = 10):
        self.batch = batch
        shapes = _input_shapes(model, batch_of(example, batch))
        modules = dict(model.named_modules())
        layers = {n: m for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n in shapes}
        self.path = Path(cache).expanduser() / f"{_key(layers, shapes, prunable, batch)}.json" if cache else None
        if self.path is not None and self.path.exists():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {"layers": {}, "dense": measure(model, example, batch, repeats=3 * repeats)}
            for n, m in layers.items():
                rows, cols = prunable.get(n, (False, False))
                self.data["layers"][n] = _time_layer(m, shapes[n], rows, cols, repeats)
            self._save()
        self.layers = self.data["layers"]
        layer_sum = sum(t["t"][-1][-1] for t in self.layers.values())
        # until fitted: the dense model's time outside the layers, as a constant
        self.a, self.b = self.data.get("fit", (max(0.0, self.data["dense"] - layer_sum), 1.0))

    @property
    def fitted(self) -> bool:
        return "fit" in self.data

    def layer_time(self, kept0: dict[str, float], kept1: dict[str, float]) -> float:
        return sum(_bilinear(t, kept0.get(n, 1.0), kept1.get(n, 1.0)) for n, t in self.layers.items())

    def predict(self, kept0: dict[str, float], kept1: dict[str, float]) -> float:
        """Seconds for one batch with layer ``n`` keeping ``kept0[n]`` of its outputs, ``kept1[n]`` of its inputs."""
        return self.a + self.b * self.layer_time(kept0, kept1)

    def fit(self, samples: list[tuple[dict[str, float], dict[str, float], float]]) -> None:
        """Least-squares ``a, b`` from measured whole-model latencies ``(kept0, kept1, seconds)``."""
        x = np.array([self.layer_time(k0, k1) for k0, k1, _ in samples])
        y = np.array([sec for _, _, sec in samples])
        b, a = np.polyfit(x, y, 1)
        self.a, self.b = float(a), float(max(b, 1e-3))
        self.data["fit"] = (self.a, self.b)
        self._save()

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data))


def _input_shapes(model: nn.Module, x: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_m, args) -> None:  # returns None: a pre-hook's return value would replace the input
            shapes.setdefault(name, tuple(args[0].shape))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(*(x if isinstance(x, tuple) else (x,)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return shapes


def _out_spatial(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(m, nn.Linear):
        return (m.out_features,) + tuple(shape[1:-1])
    h, w = shape[2], shape[3]
    k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
    if isinstance(p, str):
        return (m.out_channels, h, w)
    return (m.out_channels, (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1,
            (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


def _key(layers: dict[str, nn.Module], shapes: dict, prunable: dict, batch: int) -> str:
    desc = [(n, repr(m), shapes[n], prunable.get(n)) for n, m in layers.items()]
    raw = json.dumps([desc, batch, torch.get_num_threads(), torch.__version__, platform.machine()], default=str)
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _scaled(m: nn.Module, f0: float, f1: float) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh layer like ``m`` keeping ``f0`` of its outputs and ``f1`` of its inputs, and its input width."""
    if isinstance(m, nn.Linear):
        i, o = max(1, round(f1 * m.in_features)), max(1, round(f0 * m.out_features))
        return nn.Linear(i, o, bias=m.bias is not None), (i,)
    g = m.groups
    if g > 1 and g == m.in_channels == m.out_channels:  # depthwise: in, out and groups shrink together
        c = max(1, round(f0 * m.in_channels))
        i, o, g = c, c, c
    elif g > 1:  # grouped: the same number of channels leaves every group
        per_in, per_out = m.in_channels // g, m.out_channels // g
        i, o = g * max(1, round(f1 * per_in)), g * max(1, round(f0 * per_out))
    else:
        i, o = max(1, round(f1 * m.in_channels)), max(1, round(f0 * m.out_channels))
    layer = nn.Conv2d(i, o, m.kernel_size, m.stride, m.padding, m.dilation, g, m.bias is not None, m.padding_mode)
    return layer, (i,)


def _time_layer(m: nn.Module, shape: tuple[int, ...], rows: bool, cols: bool, repeats: int) -> dict:
    g0 = list(GRID) if rows else [1.0]
    g1 = list(GRID) if cols and not (isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1) else [1.0]
    table = []
    for f0 in g0:
        line = []
        for f1 in g1:
            layer, (width,) = _scaled(m, f0, f1)
            x = torch.randn(*(shape[:1] + (width,) + shape[2:])) if isinstance(m, nn.Conv2d) else \
                torch.randn(*(shape[:-1] + (width,)))
            line.append(measure(layer, x, x.shape[0], repeats=repeats, warmup=2))
        table.append(line)
    # fewer channels never cost more: timing noise (or per-op overhead at tiny sizes) must not invert the grid
    t = np.maximum.accumulate(np.maximum.accumulate(np.asarray(table), axis=0), axis=1)
    return {"g0": g0, "g1": g1, "t": t.tolist()}


def _bilinear(t: dict, a0: float, a1: float) -> float:
    g0, g1, tab = t["g0"], t["g1"], np.asarray(t["t"])
    along1 = [float(np.interp(a1, g1, row)) for row in tab] if len(g1) > 1 else [row[0] for row in tab]
    return float(np.interp(a0, g0, along1)) if len(g0) > 1 else along1[0]
