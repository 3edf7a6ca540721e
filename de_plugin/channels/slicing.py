"""Physically remove masked channels: the framework-free speedup of ``random_coarse`` / ``l1_filter``.

NNI's ``ModelSpeedup`` re-derives what to remove by propagating masks through its own trace, and on
today's torch it cannot follow every graph the coupling pass (:mod:`de_plugin.channels.coupling`) resolves
(grouped convs, channels-last blocks, stochastic depth). Here the coupling groups say exactly which
tensors carry each channel, so the speedup is a slicing of parameters: a removed channel is a row
of its producers (Conv2d / Linear) and of every BatchNorm, depthwise or grouped conv and per-channel
parameter over it, and input columns of its consumers. A channel is "removed" when every producer of
its group has an all-zero mask row for it (what the coarse masks give). The result computes what the
masked model computes (eval mode), with fewer parameters and MACs.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .coupling import ChannelGroup, channel_groups
from ..targets import apply_masks

log = logging.getLogger("de_plugin")


def _flat_masks(masks: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{"module.param": mask}`` from that or NNI's ``{module: {param: mask}}``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in masks.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{p}": m for p, m in v.items() if m is not None})
        else:
            out[k] = v
    return out


def kept_channels(group: ChannelGroup, masks: Mapping[str, torch.Tensor]) -> Optional[np.ndarray]:
    """Kept channels of ``group`` read off its producers' weight masks (None: no mask, nothing removed)."""
    keep = None
    for p in group.producers:
        m = masks.get(f"{p}.weight")
        if m is None:
            return None
        rows = m.reshape(m.shape[0], -1).any(1).cpu().numpy()
        keep = rows if keep is None else keep | rows
    if keep is not None and keep.all():
        return None
    if keep is not None and not keep.any():
        raise ValueError(f"the masks remove every channel of {group.producers}: nothing would be left to compute")
    return keep


class _Plan:
    """Per module: kept output channels, kept input columns; per parameter: kept indices along a dim."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.out: dict[str, np.ndarray] = {}
        self.inp: dict[str, np.ndarray] = {}
        self.params: dict[tuple[str, int], np.ndarray] = {}

    def _rows(self, table: dict, key: Any, size: int, start: int, keep: np.ndarray) -> None:
        arr = table.setdefault(key, np.ones(size, dtype=bool))
        arr[start:start + len(keep)] &= keep

    def add(self, g: ChannelGroup, keep: np.ndarray, model: nn.Module) -> None:
        for m in g.producers:
            w = self.modules[m].weight
            self._rows(self.out, m, w.shape[0], 0, keep)
        for m, off in g.batchnorms + g.depthwise + g.grouped:
            mod = self.modules[m]
            size = mod.num_features if isinstance(mod, nn.modules.batchnorm._BatchNorm) else mod.out_channels
            self._rows(self.out, m, size, off, keep)
        for m, off, rep in g.consumers:
            w = self.modules[m].weight
            self._rows(self.inp, m, w.shape[1], off, np.repeat(keep, rep))
        for name, dim, off in g.params:
            mod, _, attr = name.rpartition(".")
            p = getattr(self.modules[mod], attr)  # a parameter or a buffer
            self._rows(self.params, (name, dim), p.shape[dim], off, keep)


def _cut(t: torch.Tensor, dim: int, keep: Optional[np.ndarray]) -> torch.Tensor:
    if keep is None:
        return t
    return t.index_select(dim, torch.from_numpy(np.flatnonzero(keep)).to(t.device)).clone()


def _set(mod: nn.Module, name: str, value: Optional[torch.Tensor]) -> None:
    if value is None:
        return
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value)


def _shrink_module(mod: nn.Module, out: Optional[np.ndarray], inp: Optional[np.ndarray]) -> None:
    with torch.no_grad():
        if isinstance(mod, nn.Linear):
            _set(mod, "weight", _cut(_cut(mod.weight, 0, out), 1, inp))
            _set(mod, "bias", _cut(mod.bias, 0, out) if mod.bias is not None else None)
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, name, None) is not None:
                    _set(mod, name, _cut(getattr(mod, name), 0, out))
            mod.num_features = int(out.sum()) if out is not None else mod.num_features
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
            _set(mod, "weight", _cut(_cut(mod.weight, 0, out), 1, inp))
            _set(mod, "bias", _cut(mod.bias, 0, out) if mod.bias is not None else None)
            mod.out_channels, mod.in_channels = mod.weight.shape[:2]
        elif isinstance(mod, nn.Conv2d):
            _shrink_grouped(mod, out)
        else:
            raise TypeError(f"cannot remove channels of a {type(mod).__name__}")


def _shrink_grouped(mod: nn.Conv2d, keep: Optional[np.ndarray]) -> None:
    """Depthwise (one channel per group: whole groups go) or grouped (in == out; the same count leaves
    every group: each filter keeps the kept inputs of its own group)."""
    if keep is None:
        return
    per = mod.in_channels // mod.groups
    if per == 1:
        _set(mod, "weight", _cut(mod.weight, 0, keep))
        mod.groups = int(keep.sum())
    else:
        blocks = keep.reshape(mod.groups, per)
        counts = set(blocks.sum(1).tolist())
        if len(counts) != 1:
            raise ValueError(f"grouped conv: channels must leave every one of the {mod.groups} groups evenly, "
                             f"got kept counts {sorted(counts)}")
        w = mod.weight[torch.from_numpy(np.flatnonzero(keep))]  # kept filters
        cols = torch.from_numpy(np.stack([np.flatnonzero(b) for b in blocks]))  # kept inputs per group
        group_of = torch.arange(mod.groups).repeat_interleave(counts.pop())
        _set(mod, "weight", torch.stack([w[i, cols[group_of[i]]] for i in range(w.shape[0])]).clone())
    _set(mod, "bias", _cut(mod.bias, 0, keep) if mod.bias is not None else None)
    mod.in_channels = mod.out_channels = int(keep.sum())


def speedup(model: nn.Module, example_input: Any, masks: Mapping[str, Any],
            groups: Optional[list[ChannelGroup]] = None) -> dict[str, Any]:
    """Remove the channels ``masks`` remove from ``model``, in place; returns what was removed.

    ``masks``: ``{"module.param": bool mask}`` (``result.extra_masks`` of ``random_coarse``) or NNI's
    ``{module: {"weight": mask}}``. Weight-level zeros inside kept channels (``kernel_ratio``) stay
    zeros in the smaller tensors. ``groups`` (from :func:`de_plugin.channels.coupling.channel_groups`) saves a
    trace when the caller has them.
    """
    flat = _flat_masks(masks)
    groups = groups if groups is not None else channel_groups(model, example_input)
    modules = dict(model.named_modules())
    plan = _Plan(modules)
    removed = []
    for g in groups:
        keep = kept_channels(g, flat)
        if keep is None:
            continue
        if g.locked or g.unresolved:
            raise ValueError(f"the masks remove channels of {g.producers}, which cannot shrink: "
                             f"{g.locked or sorted(set(g.unresolved))}")
        plan.add(g, keep, model)
        removed.append({"layers": g.producers, "channels": g.channels, "kept": int(keep.sum())})
    before = sum(p.numel() for p in model.parameters())
    # masks first (zeros of kernels inside kept channels), then the slicing
    apply_masks(model, flat, strict=False)
    for name in set(plan.out) | set(plan.inp):
        _shrink_module(modules[name], plan.out.get(name), plan.inp.get(name))
    for (name, dim), keep in plan.params.items():
        mod, _, pname = name.rpartition(".")
        _set(modules[mod], pname, _cut(getattr(modules[mod], pname).detach(), dim, keep))
    after = sum(p.numel() for p in model.parameters())
    log.info("speedup: %d channel groups shrunk, parameters %d -> %d", len(removed), before, after)
    return {"groups": removed, "params_before": before, "params_after": after}
