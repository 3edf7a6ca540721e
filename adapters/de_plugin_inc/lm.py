"""A searched language-model allocation handed to INC 3.7's LLM pruning (SparseGPT), one config entry per op.

INC 3.7.1's ``prepare_pruning(model, WeightPruningConfig([...]), dataloader=...)`` runs SparseGPT block
by block at each entry's ``target_sparsity``; INC itself has no way to choose those per-layer values.
:func:`pruning_configs` turns :func:`de_plugin.lm.prune_lm`'s result (or any ``{layer name: sparsity}``)
into the entries, :func:`prune_with_inc` runs INC's pass with them:

    result = prune_lm(model, calibration, 0.7, method="sparsegpt")      # the searched allocation
    prune_with_inc(model, result, calibration)                          # INC's SparseGPT at those targets

INC's pass is sequential (each block calibrated on the already pruned blocks' outputs, as in the
SparseGPT paper); ``prune_lm`` scores every layer on the dense model's activations. INC 3.8 and newer
have no pruning API: there, use ``prune_lm``'s model itself.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from de_plugin.adapter import LMPruningResult, check_tokens, decoder_layers, find_blocks, undone_on_error

from . import require_inc

Allocation = Union[LMPruningResult, Mapping[str, float]]


def _sparsities(allocation: Allocation) -> dict[str, float]:
    if isinstance(allocation, LMPruningResult):
        return dict(allocation.layer_sparsity)
    if not isinstance(allocation, Mapping) or not allocation:
        raise TypeError(f"allocation must be prune_lm's result or a {{layer name: sparsity}} dict, "
                        f"got {type(allocation).__name__}")
    return {str(k): float(v) for k, v in allocation.items()}


def pruning_configs(allocation: Allocation, pruning_type: str = "sparse_gpt", pattern: str = "1x1") -> list[dict]:
    """One INC pruning-config entry per layer (``op_names``: the layer's exact name as INC's regular
    expression), in the allocation's order (the decoder's module order for ``prune_lm``'s result)."""
    out = []
    for name, s in _sparsities(allocation).items():
        if not 0.0 <= s < 1.0:
            raise ValueError(f"layer {name}: sparsity {s} outside [0, 1)")
        out.append({"op_names": [f"^{re.escape(name)}$"], "target_sparsity": s, "pattern": pattern,
                    "pruning_type": pruning_type})
    return out


class _QuietSparseGPT(logging.Filter):
    """Quirk (INC 3.7.1): the SparseGPT pass warns "sparse_gpt pruner fixed the weights, Please DO NOT train"
    once per pruned layer (dozens of lines for one call that trains nothing). Drop that line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pruner fixed the weights" not in record.getMessage()


@contextmanager
def _inc_ready(model: nn.Module) -> Iterator[None]:
    """Quirks of INC 3.7.1's SparseGPT pass, undone afterwards:
    * it replays each block as ``block(hidden, ...)[0]``, written for transformers 4.x blocks that return
      tuples; transformers 5.x blocks (and plain ones) return the tensor, so ``[0]`` dropped the batch
      axis ("not enough values to unpack" / a rotary-embedding size mismatch): blocks return a 1-tuple here;
    * it reads ``model.device``, which only ``transformers`` models have (AttributeError otherwise)."""
    _, blocks = find_blocks(model)
    for block in blocks:
        plain = block.forward

        def as_tuple(*args: Any, _forward=plain, **kwargs: Any):
            out = _forward(*args, **kwargs)
            return out if isinstance(out, tuple) else (out,)
        block.forward = as_tuple
    added = not hasattr(model, "device")
    if added:
        model.device = next(model.parameters()).device
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        if added:
            del model.device


def prune_with_inc(model: nn.Module, allocation: Allocation, calibration: Any, *, pruning_type: str = "sparse_gpt",
                   device: str = "cpu") -> nn.Module:
    """Prune ``model`` in place with INC 3.7's ``pruning_type`` at the allocation's per-layer targets; if INC
    fails on the way, the model's weights are put back as they were."""
    require_inc("legacy")
    from neural_compressor import WeightPruningConfig
    from neural_compressor.compression.pruner import prepare_pruning

    batches = check_tokens(calibration)
    names = {l.name for l in decoder_layers(model)}
    missing = [n for n in _sparsities(allocation) if n not in names]
    if missing:
        raise ValueError(f"the allocation names layers this model's decoder does not have: {missing[:3]}; "
                         "pass the result of prune_lm on this model (or its architecture)")
    config = WeightPruningConfig(pruning_configs(allocation, pruning_type))
    inc_log = logging.getLogger("neural_compressor")
    if not any(isinstance(f, _QuietSparseGPT) for f in inc_log.filters):
        inc_log.addFilter(_QuietSparseGPT())
    with undone_on_error(model, inplace=True), _inc_ready(model), torch.no_grad():
        prepare_pruning(model, config, dataloader=list(batches), device=device)
    return model


def layer_order(model: nn.Module) -> Sequence[str]:
    """The decoder layers' names in INC's (and the model's) module order."""
    return [l.name for l in decoder_layers(model)]
