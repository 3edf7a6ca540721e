"""Pattern masks (``1x1``, ``NxM`` blocks, ``N:M``) in the framework-free core.

INC 3.7's pruning patterns went away with INC 3.8, but users who quantize with INC still want the
sparsity shapes INC's kernels and their hardware like. These masks follow INC 3.7's conventions, so
the same per-layer sparsity gives the same kind of mask on either INC route:

* a weight is seen as a matrix ``[C_out, rest]``; a conv's ``[C_out, C_in, kh, kw]`` is permuted to
  ``[C_out, kh, kw, C_in]`` first (INC's ``_reshape_orig_to_2dims``), so blocks run along input channels;
* ``NxM``: blocks of N rows by M columns scored by their mean magnitude; the lowest-scoring blocks
  are pruned (``1x1`` is plain magnitude pruning);
* ``N:M``: in each run of M consecutive weights of a row the N smallest are the candidates; at a
  layer sparsity ``s`` the ``s * M / N`` share of runs with the smallest candidates is pruned, so a
  layer can reach at most ``N / M``.

Counts are exact (``round(s * blocks)`` blocks) and ties break by position, so masks are repeatable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["Pattern", "parse_pattern", "pattern_mask", "PatternScorer"]


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``kind`` is ``"block"`` (N rows x M columns) or ``"nm"`` (N of every M)."""

    kind: str
    n: int
    m: int

    @property
    def max_sparsity(self) -> float:
        return self.n / self.m if self.kind == "nm" else 1.0

    def __str__(self) -> str:
        return f"{self.n}x{self.m}" if self.kind == "block" else f"{self.n}:{self.m}"


def parse_pattern(spec: str) -> Pattern:
    """``"1x1"``, ``"4x1"``, ``"2:4"``... -> :class:`Pattern`; a clear ``ValueError`` otherwise."""
    text = str(spec).strip()
    block = re.fullmatch(r"(\d+)x(\d+)", text)
    nm = re.fullmatch(r"(\d+):(\d+)", text)
    if block and int(block[1]) > 0 and int(block[2]) > 0:
        return Pattern("block", int(block[1]), int(block[2]))
    if nm and 0 < int(nm[1]) < int(nm[2]):
        return Pattern("nm", int(nm[1]), int(nm[2]))
    raise ValueError(f"unknown pattern {spec!r}: use 'NxM' blocks ('1x1' unstructured, '4x1') or 'N:M' with N < M "
                     "('2:4' prunes 2 of every 4 consecutive weights)")


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """INC's 2-D view of a weight: ``[C_out, kh*kw*C_in]`` for a conv (input channels innermost)."""
    if w.dim() == 2:
        return w
    if w.dim() in (3, 4):
        return w.permute(0, *range(2, w.dim()), 1).reshape(w.shape[0], -1)
    raise ValueError(f"patterns need a 2-D (Linear) or 3-/4-D (conv) weight, got shape {tuple(w.shape)}")


def from_matrix(m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`as_matrix`."""
    if len(shape) == 2:
        return m
    permuted = (shape[0], *shape[2:], shape[1])
    return m.reshape(permuted).permute(0, len(shape) - 1, *range(1, len(shape) - 1))


def check_fits(pattern: Pattern, name: str, shape) -> None:
    rows, cols = shape[0], int(torch.Size(shape).numel() // shape[0])
    if pattern.kind == "block" and (rows % pattern.n or cols % pattern.m):
        raise ValueError(f"layer {name!r} (weight {tuple(shape)}, {rows}x{cols} as a matrix) cannot be cut into "
                         f"{pattern} blocks: exclude it or choose a pattern that divides its shape")
    if pattern.kind == "nm" and cols % pattern.m:
        raise ValueError(f"layer {name!r} (weight {tuple(shape)}) has {cols} inputs per row, not a multiple of "
                         f"{pattern.m} for {pattern}: exclude it or choose another pattern")


def block_scores(w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """One score per prunable unit, flat: block means (``NxM``) or the sum of each run's N smallest (``N:M``)."""
    a = as_matrix(w.detach()).abs().float()
    if pattern.kind == "block":
        r, c = a.shape
        return a.reshape(r // pattern.n, pattern.n, c // pattern.m, pattern.m).mean(dim=(1, 3)).flatten()
    runs = a.reshape(a.shape[0], -1, pattern.m)
    return runs.sort(dim=-1).values[..., : pattern.n].sum(-1).flatten()


def units_pruned(numel_units: int, sparsity: float, pattern: Pattern) -> int:
    """How many units (blocks or runs) a layer sparsity prunes."""
    if not 0.0 <= sparsity <= pattern.max_sparsity + 1e-9:
        raise ValueError(f"sparsity {sparsity:.4f} is out of reach for pattern {pattern} (at most {pattern.max_sparsity})")
    share = sparsity / pattern.max_sparsity
    return min(numel_units, int(round(share * numel_units)))


def pattern_mask(w: torch.Tensor, sparsity: float, pattern: Pattern | str,
                 scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean keep-mask of ``w``'s shape pruning ``sparsity`` of it in ``pattern``'s units.

    ``scores`` (from :func:`block_scores`) can be passed in when the same layer is masked many times."""
    p = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    s = block_scores(w, p) if scores is None else scores
    k = units_pruned(s.numel(), float(sparsity), p)
    keep_units = torch.ones(s.numel(), dtype=torch.bool, device=w.device)
    if k:
        order = torch.sort(s, stable=True).indices
        keep_units[order[:k]] = False
    a = as_matrix(w)
    if p.kind == "block":
        grid = keep_units.view(a.shape[0] // p.n, a.shape[1] // p.m)
        keep = grid.repeat_interleave(p.n, 0).repeat_interleave(p.m, 1)
    else:
        runs = as_matrix(w.detach()).abs().reshape(a.shape[0], -1, p.m)
        smallest = torch.zeros_like(runs, dtype=torch.bool)
        smallest.scatter_(-1, runs.sort(dim=-1, stable=True).indices[..., : p.n], True)
        keep = ~(smallest & ~keep_units.view(a.shape[0], -1, 1))
        keep = keep.reshape(a.shape)
    return from_matrix(keep, w.shape).contiguous()


class PatternScorer:
    """Per-layer keep counts -> pattern masks on the layers -> ``eval_func()``: the
    :class:`de_plugin.evaluation.Scorer` the allocator searches with when masks come in a pattern.

    ``masker(name, score, ratio)`` gives a layer's keep-mask at a sparsity ``ratio`` from its
    ``score_of(name, weight)``: the core's patterns by default, or a framework's own (INC 3.7's pattern
    objects in ``de_plugin_inc``), so the search scores the masks that will be applied."""

    def __init__(self, modules: Dict[str, nn.Module], eval_func: Callable[[], float], pattern: str = "1x1",
                 masker: Optional[Callable[[str, torch.Tensor, float], torch.Tensor]] = None,
                 score_of: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None):
        self.names: List[str] = list(modules)
        # the round's weights travel to workers as this holder's state (keys cannot contain dots)
        self.model = nn.ModuleDict({n.replace(".", "/"): modules[n] for n in self.names})
        self.modules, self.eval_func = modules, eval_func
        if masker is None:
            p = parse_pattern(pattern)
            for n in self.names:
                check_fits(p, n, modules[n].weight.shape)
            masker = lambda n, s, r: pattern_mask(self.saved[self.names.index(n)], r, p, s)  # noqa: E731
            score_of = lambda n, w: block_scores(w, p)  # noqa: E731
        self.masker, self.score_of = masker, score_of or (lambda n, w: w.abs())
        self.reset()

    def reset(self) -> None:
        self.weights = [self.modules[n].weight for n in self.names]
        self.saved = [w.detach().clone() for w in self.weights]
        self.scores = {n: self.score_of(n, w) for n, w in zip(self.names, self.saved)}

    def masks(self, counts) -> Dict[str, torch.Tensor]:
        """Keep-masks for per-layer keep counts (the allocator's candidate)."""
        out = {}
        for n, w0, k in zip(self.names, self.saved, counts):
            out[n] = self.masker(n, self.scores[n], float(1.0 - int(k) / w0.numel()))
        return out

    def score(self, counts, floor=None) -> float:
        from ..evaluation import check_score

        with torch.no_grad():
            for (n, m), w, w0 in zip(self.masks(counts).items(), self.weights, self.saved):
                w.copy_(w0 * m.to(w0.dtype))
            try:
                return check_score(self.eval_func())
            finally:
                self.restore()

    def restore(self) -> None:
        with torch.no_grad():
            for w, w0 in zip(self.weights, self.saved):
                w.copy_(w0)
