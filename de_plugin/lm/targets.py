"""The prunable Linear layers of a causal language model's decoder blocks.

A decoder is recognised by its structure, not its class: the longest ``nn.ModuleList`` whose
entries each hold at least two Linear-like layers (``transformer.h`` in GPT-2, ``model.layers`` in
Llama / Mistral, ``blocks`` in :mod:`de_plugin.demo.lm`). Linear-like means ``nn.Linear`` or a module
with a 2-D ``weight`` named ``Conv1D`` (``transformers``' GPT-2 layer, which stores the weight as
``[in, out]``); embeddings and the output head lie outside the blocks and are never targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LMLayer:
    """One target: where it sits (``block``, ``name``) and how its weight is laid out."""

    name: str
    module: nn.Module
    block: int
    #: True for GPT-2's Conv1D (``weight`` is ``[in, out]``); the methods work on ``[out, in]``
    transposed: bool

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    def set_weight(self, w_out_in: torch.Tensor) -> None:
        """Write an ``[out, in]`` weight back in the module's own layout."""
        with torch.no_grad():
            self.module.weight.copy_(w_out_in.t() if self.transposed else w_out_in)

    @property
    def numel(self) -> int:
        return int(self.module.weight.numel())

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


def is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if n and is_linear_like(m)]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's block list (see the module docstring); ValueError when the model has none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(len(_linears(b)) >= 2 for b in mod):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder blocks with Linear layers: expected an nn.ModuleList of "
            "blocks, each holding attention / MLP projections (nn.Linear or transformers' Conv1D), such as "
            "GPT-2's transformer.h or Llama's model.layers. For other models use de_plugin.prune with de_layerwise")
    return best


def decoder_layers(model: nn.Module) -> list[LMLayer]:
    """Every Linear-like layer inside the decoder blocks, block by block in module order."""
    prefix, blocks = find_blocks(model)
    layers = []
    for i, block in enumerate(blocks):
        for n, m in _linears(block):
            layers.append(LMLayer(f"{prefix}.{i}.{n}" if prefix else f"{i}.{n}", m, i,
                                  not isinstance(m, nn.Linear)))
    return layers
