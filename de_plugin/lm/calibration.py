"""Calibration tokens, checked once, and the input statistics every in-layer method needs.

Calibration data is token batches: a ``LongTensor`` ``[batch, length]`` or a list of them (token ids,
not text). One forward pass of the dense model over them records, per target layer, the inputs'
second moment ``H = sum_t x_t x_t^T`` (SparseGPT's Hessian, kept only when asked), the squared
column norms ``diag(H)`` (Wanda's ``||X_j||^2``) and the column sums ``sum_t x_t`` (width pruning's refit
of a bias), each on the device of its layer's weights, where its inputs arrive. For the search every layer sees the dense model's
activations (one pass); the final model can be pruned block by block instead (``sequential``, as the
SparseGPT and Wanda papers do), each block's statistics taken with the blocks before it already pruned.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .targets import LMLayer


def check_tokens(data: Any, what: str = "calibration") -> list[torch.Tensor]:
    """``data`` as a list of ``[batch, length]`` integer tensors, or a ValueError saying what it is instead."""
    batches = [data] if isinstance(data, torch.Tensor) else data
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"{what} must be token batches: a LongTensor [batch, length] of token ids or a non-empty "
                         f"list of them, got {type(data).__name__}")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dtype not in (torch.int64, torch.int32) or b.dim() != 2:
            got = (f"a {b.dtype} tensor of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor)
                   else type(b).__name__)
            raise ValueError(f"{what} batch {i} must be an integer tensor [batch, length] of token ids, got {got}; "
                             "tokenize text first (e.g. tokenizer(text, return_tensors='pt').input_ids)")
        if b.shape[1] < 2:
            raise ValueError(f"{what} batch {i} has length {b.shape[1]}: next-token fitness needs at least 2 tokens")
    return [b.long() for b in batches]


def input_device(model: nn.Module) -> torch.device:
    """Where the model reads its token ids: its input embedding's device (``transformers``'
    ``get_input_embeddings``, else the first ``nn.Embedding``), else its first parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:  # transformers' base class, for models that do not say
        emb = None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    param = emb.weight if emb is not None else next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[batch, length, vocab]`` of a plain module or a ``transformers`` model; token ids
    held elsewhere (calibration on the CPU, the model on a GPU) are moved to the model's input device."""
    out = model(tokens.to(input_device(model)))
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


class LayerStats:
    """Per-layer input statistics from one pass over the calibration tokens."""

    def __init__(self, norms_sq: list[torch.Tensor], hessians: list[torch.Tensor] | None, tokens: int,
                 sums: list[torch.Tensor] | None = None):
        self.norms_sq, self.hessians, self.tokens, self.sums = norms_sq, hessians, tokens, sums

    def norms(self, i: int) -> torch.Tensor:
        """Wanda's ``||X_j||_2`` for layer i's input columns."""
        return self.norms_sq[i].sqrt()


class _Seen(BaseException):
    """Stops a forward pass once every layer whose statistics are wanted has had its input."""


@torch.no_grad()
def collect_stats(model: nn.Module, layers: Sequence[LMLayer], batches: Sequence[torch.Tensor],
                  hessians: bool = False, stop_early: bool = False) -> LayerStats:
    """Run the model once over ``batches`` and record each layer's input statistics. ``stop_early``: end
    each batch's forward pass as soon as every layer in ``layers`` has run (the rest of the model
    cannot change their inputs), as sequential pruning does for every block."""
    dev = [l.module.weight.device for l in layers]  # each layer's statistics where its inputs arrive
    norms = [torch.zeros(l.in_features, dtype=torch.float64, device=d) for l, d in zip(layers, dev)]
    sums = [torch.zeros(l.in_features, dtype=torch.float64, device=d) for l, d in zip(layers, dev)]  # a bias's refit
    hs = ([torch.zeros(l.in_features, l.in_features, dtype=torch.float64, device=d) for l, d in zip(layers, dev)]
          if hessians else None)
    count = [0]

    def hook(i):
        def record(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            norms[i] += (x * x).sum(0)
            sums[i] += x.sum(0)
            if hs is not None:
                hs[i] += x.t() @ x
        return record

    seen: set[int] = set()

    def done(i):
        def check(_mod, _inputs, _output):
            seen.add(i)
            if len(seen) == len(layers):
                raise _Seen
        return check

    handles = [l.module.register_forward_pre_hook(hook(i)) for i, l in enumerate(layers)]
    if stop_early:
        handles += [l.module.register_forward_hook(done(i)) for i, l in enumerate(layers)]
    try:
        for b in batches:
            seen.clear()
            try:
                logits_of(model, b)
            except _Seen:
                pass
            count[0] += b.numel()
    finally:
        for h in handles:
            h.remove()
    return LayerStats([n.float() for n in norms], [h.float() for h in hs] if hs is not None else None, count[0],
                      [v.float() for v in sums])


#: float64 input moments accumulated at once by :func:`collect_hessians` (bytes); more go in runs of layers
MOMENT_BYTES = 1 << 30


def moment_bytes(layer: "LMLayer | nn.Linear") -> int:
    """The float64 bytes of a layer's (a target's or a Linear's) input second moment, a bias row included."""
    return 8 * (layer.in_features + 1) ** 2


def runs_within(layers: Sequence[LMLayer], limit: int) -> list[list[LMLayer]]:
    """``layers`` in order, in runs whose moments take at most ``limit`` bytes together (a layer that alone
    takes more is a run of its own)."""
    out: list[list[LMLayer]] = []
    size = 0
    for l in layers:
        if not out or size + moment_bytes(l) > limit:
            out.append([])
            size = 0
        out[-1].append(l)
        size += moment_bytes(l)
    return out


def collect_hessians(model: nn.Module, layers: Sequence[LMLayer], batches: Sequence[torch.Tensor],
                     limit: Optional[int] = None) -> LayerStats:
    """:func:`collect_stats` with the Hessians, accumulating at most ``limit`` bytes of them at a time
    (:data:`MOMENT_BYTES` by default). Within the limit: one pass, everything where the layers are. Above it
    (every Hessian of a 7B model takes about 57 GB in float64): runs of layers in model order, one partial
    pass each, each run's Hessians moved to host memory as float32 once collected, so the accelerator holds
    one run's accumulators at a time. The statistics are the same either way."""
    runs = runs_within(layers, MOMENT_BYTES if limit is None else limit)
    if len(runs) == 1:
        return collect_stats(model, layers, batches, hessians=True)
    norms, hs, sums, tokens = [], [], [], 0
    for run in runs:
        part = collect_stats(model, run, batches, hessians=True, stop_early=True)
        norms += part.norms_sq
        hs += [h.cpu() for h in part.hessians]
        sums += part.sums
        tokens = part.tokens
        del part
    return LayerStats(norms, hs, tokens, sums)
