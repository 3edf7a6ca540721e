"""Structured width: attention heads and MLP hidden units kept per decoder block, searched under a
parameter budget, then sliced away so the model is physically smaller.

Per block, the prunable units are the attention heads (q / k / v output rows and o input columns of a
head, together; with grouped-query attention a key / value head and the query heads that share it, as one
unit) and the MLP's hidden units (up / gate output rows and down input columns). Which units go inside a block
follows a structured Wanda score from one pass over the calibration tokens: a hidden unit's
``||X_j||_2 ||W_down[:, j]||_2``, a head's sum of the same over its o-projection columns. Dropping a unit
is zeroing its column in ``down`` / ``o`` (what the search scores) and is then made real by slicing
every layer of the group: the outputs are the same.

How many units each block keeps is searched (the project's allocator; EvoPress-style by default) with
the KL fitness, seeded with uniform width (every block keeps the same share of heads and hidden units)
and with the MLP-only allocation (all heads kept); ``allocation="uniform"`` is the baseline itself.
The budget is the decoder Linear layers' parameters (weights and biases), met to within one hidden unit.

With ``refit`` (on by default) each pruned ``o`` / ``down`` projection's kept columns and bias are
re-fitted by least squares to the dense layer's output on the calibration tokens: what the removed units
contributed on average, and what the kept units correlated with them can carry, stays in the layer. While
every layer's input moments fit in memory the search scores each candidate re-fitted; above that only the
final widths are re-fitted, a run of layers at a time (``refit="final"``).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from ..options import options_from
from ..search.allocator import KeepSpace
from ..search.budget import fit_budget
from .calibration import MOMENT_BYTES, check_tokens, collect_stats, moment_bytes, runs_within
from .fitness import DenseReference
from .search import OneShotOptions, OneShotResult, fitness_fn, reported, score_counts, search_counts, undone_on_error
from .targets import LMLayer, find_blocks

log = logging.getLogger("de_plugin")
#: ``refit=None`` re-fits while the o / down inputs' second moments (float64) take at most this many bytes
REFIT_AUTO_BYTES = MOMENT_BYTES
Q, K, V, O = ("q_proj",), ("k_proj",), ("v_proj",), ("o_proj", "out_proj")
MLP_IN, MLP_OUT = ("up_proj", "gate_proj", "fc1"), ("down_proj", "fc2")


def _params(m: nn.Linear) -> int:
    return m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)


@dataclass
class WidthBlock:
    """One decoder block's prunable groups (module paths relative to the model)."""

    index: int
    attn: dict[str, str]  # q, k, v, o -> module path ({} when heads are not pruned)
    heads: int  # the block's prunable head units: key / value heads (0: unknown); query heads when not pruned
    mlp_in: list[str]
    mlp_out: str
    head_dim: int
    units: int
    head_cost: int = 0
    unit_cost: int = 0
    group: int = 1  # query heads per unit (grouped-query attention: per key / value head)

    @property
    def outputs(self) -> list[str]:
        """The projections whose input columns the block's units are: ``down``, and ``o`` when heads prune."""
        return [self.mlp_out] + ([self.attn["o"]] if self.attn else [])


def _find(block: nn.Module, prefix: str, names: tuple[str, ...]) -> Optional[str]:
    for n, m in block.named_modules():
        if isinstance(m, nn.Linear) and n.split(".")[-1] in names:
            return f"{prefix}.{n}"
    return None


def width_blocks(model: nn.Module) -> list[WidthBlock]:
    """Each decoder block's heads and hidden units; ValueError when the blocks lack a recognisable MLP."""
    prefix, blocks = find_blocks(model)
    mods = dict(model.named_modules())
    out = []
    for i, block in enumerate(blocks):
        pre = f"{prefix}.{i}" if prefix else str(i)
        ins = [p for p in (_find(block, pre, (n,)) for n in MLP_IN) if p]
        down = _find(block, pre, MLP_OUT)
        if not ins or down is None:
            raise ValueError(f"block {pre} has no MLP of nn.Linear layers named up_proj / gate_proj / fc1 and "
                             "down_proj / fc2: width pruning knows Llama-, OPT- and TinyGPT-style blocks; for other "
                             "models prune unstructured (prune_lm)")
        attn = {k: _find(block, pre, names) for k, names in zip("qkvo", (Q, K, V, O))}
        q = mods[attn["q"]] if attn["q"] else None
        parent = mods[attn["q"].rsplit(".", 1)[0]] if q is not None else None
        hd = getattr(parent, "head_dim", None) or getattr(block, "head_dim", None)
        heads = q.out_features // hd if q is not None and hd else 0
        kv = mods[attn["k"]].out_features // hd if attn["k"] and hd else 0
        # heads prune as units of one key / value head and its query heads; with a single key / value head
        # there is nothing to remove without removing attention
        units = (all(attn.values()) and hd and q.out_features % hd == 0 and kv and heads % kv == 0
                 and mods[attn["k"]].out_features == kv * hd and (kv == heads or kv > 1))
        wb = WidthBlock(i, attn if units else {}, int(kv if units else heads), ins, down, int(hd or 0),
                        mods[down].in_features, group=int(heads // kv) if units else 1)
        _costs(wb, mods)
        out.append(wb)
    return out


def _costs(wb: WidthBlock, mods: dict[str, nn.Module]) -> None:
    d_unit = sum(mods[p].in_features + (1 if mods[p].bias is not None else 0) for p in wb.mlp_in)
    wb.unit_cost = d_unit + mods[wb.mlp_out].out_features
    if wb.attn:
        q, k, v = (mods[wb.attn[n]] for n in "qkv")
        row = lambda m: m.in_features + (1 if m.bias is not None else 0)  # noqa: E731
        wb.head_cost = wb.head_dim * (wb.group * (row(q) + mods[wb.attn["o"]].out_features) + row(k) + row(v))


def decoder_params(model: nn.Module) -> int:
    """Parameters of the decoder blocks' Linear layers (what the width budget counts)."""
    _, blocks = find_blocks(model)
    return sum(_params(m) for b in blocks for m in b.modules() if isinstance(m, nn.Linear))


class WidthMasks:
    """Candidates (heads kept per block, then hidden units kept per block) written into the model as zeroed
    ``o`` / ``down`` columns, the lowest-scoring units first; ``restore`` puts the dense weights back.

    With ``moments`` (per ``o`` / ``down`` path: the inputs' ``H = sum x x^T``, ``sum x`` and the token
    count) the kept columns and the bias are re-fitted by least squares to the dense layer's output on the
    calibration inputs (``W_K + W_R H_RK H_KK^-1``, the bias as a column of ones): the removed units'
    average and correlated contribution is carried by the ones kept, with no retraining."""

    def __init__(self, model: nn.Module, blocks: list[WidthBlock], norms: dict[str, torch.Tensor],
                 moments: Optional[dict[str, tuple[torch.Tensor, torch.Tensor, int]]] = None):
        self.mods, self.blocks = dict(model.named_modules()), blocks
        paths = [p for b in blocks for p in b.outputs]
        self.dense = {p: self.mods[p].weight.detach().clone() for p in paths}
        self.dense_bias = {p: self.mods[p].bias.detach().clone() for p in paths if self.mods[p].bias is not None}
        # the refit's float64 systems, bias folded in, built once (every candidate solves against them)
        self.systems = ({p: augmented(self.dense[p], self.dense_bias.get(p), *moments[p]) for p in paths}
                        if moments else {})
        self.unit_order, self.head_order = [], []
        for b in blocks:
            w = self.dense[b.mlp_out].float()
            self.unit_order.append(torch.argsort(norms[b.mlp_out] * w.norm(dim=0), descending=True, stable=True))
            if b.attn:
                s = norms[b.attn["o"]] * self.dense[b.attn["o"]].float().norm(dim=0)
                s = s.view(b.heads, b.group * b.head_dim).sum(1)
                self.head_order.append(torch.argsort(s, descending=True, stable=True))
            else:
                self.head_order.append(None)

    def kept(self, counts) -> list[tuple[Optional[torch.Tensor], torch.Tensor]]:
        """Per block: the kept head indices (None: all) and kept hidden-unit indices, both sorted."""
        nb, heads = len(self.blocks), [b for b in self.blocks if b.attn]
        out, hi = [], 0
        for i, b in enumerate(self.blocks):
            h = None
            if b.attn:
                h = torch.sort(self.head_order[i][:int(counts[hi])]).values
                hi += 1
            out.append((h, torch.sort(self.unit_order[i][:int(counts[len(heads) + i])]).values))
        assert len(out) == nb
        return out

    def keeps(self, counts) -> dict[str, torch.Tensor]:
        """Per ``o`` / ``down`` path: which of its input columns ``counts`` keeps."""
        out = {}
        for b, (h, u) in zip(self.blocks, self.kept(counts)):
            keep = torch.zeros(self.dense[b.mlp_out].shape[1], dtype=torch.bool, device=u.device)
            keep[u] = True
            out[b.mlp_out] = keep
            if h is not None:
                keep = torch.zeros(b.heads, dtype=torch.bool, device=h.device)
                keep[h] = True
                out[b.attn["o"]] = keep.repeat_interleave(b.group * b.head_dim)
        return out

    def apply(self, counts, exact: bool = False, fitted: Optional[dict[str, tuple]] = None) -> None:
        """Write ``counts`` into the model; ``fitted``: re-fitted (weight, bias) per path, computed elsewhere
        (:func:`refit_streamed`), written instead of zeroed columns."""
        with torch.no_grad():
            for path, keep in self.keeps(counts).items():
                self._write(path, keep, (fitted or {}).get(path))

    def _write(self, path: str, keep: torch.Tensor, fitted: Optional[tuple] = None) -> None:
        """Layer ``path`` with only the input columns in ``keep`` (re-fitted when there are moments)."""
        w, mod = self.dense[path], self.mods[path]
        if fitted is None and (not self.systems or bool(keep.all())):
            mod.weight.copy_(w * keep.to(w.dtype))
            if mod.bias is not None:
                mod.bias.copy_(self.dense_bias[path])
            return
        new_w, new_b = fitted if fitted is not None else solve_refit(*self.systems[path], keep, w.dtype)
        mod.weight.copy_(new_w)
        if new_b is not None:
            mod.bias.copy_(new_b)

    def restore(self) -> None:
        with torch.no_grad():
            for p, w in self.dense.items():
                self.mods[p].weight.copy_(w)
            for p, b in self.dense_bias.items():
                self.mods[p].bias.copy_(b)


def refit(w: torch.Tensor, bias: Optional[torch.Tensor], h: torch.Tensor, sums: torch.Tensor, tokens: int,
          keep: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The least-squares weights of a layer restricted to its ``keep`` input columns: minimise
    ``||W X + b - W'_K X_K - b'||`` over the calibration inputs (``h = X X^T``, ``sums = X 1``), i.e.
    ``W'_K = W_K + W_R H_RK H_KK^-1`` with the bias as an input of ones (kept). ``damp``: a share of the mean
    diagonal added to ``H_KK`` (SparseGPT's dampening) so a rank-deficient calibration set still solves.
    Returns the full-width weight (removed columns zero) and the new bias (None without one)."""
    return solve_refit(*augmented(w, bias, h, sums, tokens), keep, w.dtype, damp)


def augmented(w: torch.Tensor, bias: Optional[torch.Tensor], h: torch.Tensor, sums: torch.Tensor,
              tokens: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(W | b, H)`` in float64 with the bias as the weight of a constant input 1 (``H`` grows by the input
    sums and the token count), and whether there is a bias."""
    hd, wd = h.double(), w.double()
    if bias is None:
        return wd, hd, False
    s = sums.double()
    hd = torch.cat([torch.cat([hd, s[:, None]], 1), torch.cat([s, s.new_tensor([float(tokens)])])[None, :]], 0)
    return torch.cat([wd, bias.double()[:, None]], 1), hd, True


def solve_refit(wa: torch.Tensor, hd: torch.Tensor, has_bias: bool, keep: torch.Tensor, dtype: torch.dtype,
                damp: float = 0.01) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`refit` on an :func:`augmented` system."""
    d = wa.shape[1] - has_bias
    if has_bias:
        keep = torch.cat([keep, keep.new_ones(1)])
    k, r = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    a = hd[k][:, k]
    a = a + damp * a.diagonal().mean() * torch.eye(len(k), dtype=torch.float64, device=a.device)
    m = torch.linalg.solve(a, hd[k][:, r])  # H_KK^-1 H_KR
    out = torch.zeros_like(wa)
    out[:, k] = wa[:, k] + wa[:, r] @ m.t()
    return out[:, :d].to(dtype), (out[:, d].to(dtype) if has_bias else None)


@torch.no_grad()
def refit_streamed(model: nn.Module, masks: WidthMasks, layers: list[LMLayer], batches: list[torch.Tensor],
                   counts, limit: int) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The final widths' refit without every layer's moments in memory at once (``refit="final"``): the
    o / down layers that lose columns, in runs of at most ``limit`` bytes of moments, each run's moments
    taken on one partial pass of the dense model over ``batches`` (the same statistics as the in-memory
    refit's), solved, then freed. The fitted weights wait in host memory and are written after the last
    run, so every run sees dense inputs. ``model`` must hold its dense weights."""
    keeps = masks.keeps(counts)
    fitted = {}
    for run in runs_within([l for l in layers if not bool(keeps[l.name].all())], limit):
        stats = collect_stats(model, run, batches, hessians=True, stop_early=True)
        for i, l in enumerate(run):
            w, b = solve_refit(*augmented(masks.dense[l.name], masks.dense_bias.get(l.name), stats.hessians[i],
                                          stats.sums[i], stats.tokens), keeps[l.name], masks.dense[l.name].dtype)
            fitted[l.name] = (w.cpu(), b.cpu() if b is not None else None)
        del stats
    return fitted


class WidthSpace(KeepSpace):
    """x: the kept share of each block's heads (blocks with prunable heads), then of its hidden units; a
    vector's counts meet the parameter budget by scaling the hidden units (heads fewer where they must)."""

    def __init__(self, blocks: list[WidthBlock], fixed: int, low: float):
        self.blocks, self.fixed = blocks, fixed
        self.hb = [b for b in blocks if b.attn]
        numels = np.array([b.heads for b in self.hb] + [b.units for b in blocks], dtype=np.int64)
        super().__init__(numels, np.ones(len(numels), dtype=np.int64), numels, [(low, 1.0)] * len(numels))
        self.unit_cost = np.array([b.unit_cost for b in blocks])

    def to_counts(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(np.asarray(x) * self.numels).astype(np.int64), 1, self.numels)

    def to_x(self, counts: np.ndarray) -> np.ndarray:
        return np.asarray(counts) / self.numels

    def project(self, x: np.ndarray, budget: int) -> np.ndarray:
        c = self.to_counts(x)
        nh = len(self.hb)
        heads = c[:nh].copy()
        units_n = self.numels[nh:]
        while True:
            left = budget - self.fixed - sum(int(h) * b.head_cost for h, b in zip(heads, self.hb))
            total_units = int(left // self.unit_cost.mean())
            if total_units >= len(units_n) or not (heads > 1).any():
                break
            heads[int(np.argmax(heads))] -= 1  # the heads alone exceed the budget: fewer heads
        total_units = int(min(max(total_units, len(units_n)), units_n.sum()))
        units = fit_budget(np.asarray(x, dtype=float)[nh:], units_n, total_units, np.ones(len(units_n), dtype=np.int64))
        return np.concatenate([heads, units])

    def params(self, counts: np.ndarray) -> int:
        nh = len(self.hb)
        return int(self.fixed + sum(int(h) * b.head_cost for h, b in zip(counts[:nh], self.hb))
                   + sum(int(u) * b.unit_cost for u, b in zip(counts[nh:], self.blocks)))


def _sliced(m: nn.Linear, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> nn.Linear:
    w = m.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if m.bias is not None:
            new.bias.copy_(m.bias.detach()[rows] if rows is not None else m.bias.detach())
    return new


def slice_width(model: nn.Module, blocks: list[WidthBlock], kept) -> None:
    """Replace each block's layers by smaller ones keeping only ``kept`` heads / hidden units."""
    mods = dict(model.named_modules())

    def put(path: str, new: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(mods[parent] if parent else model, name, new)

    for b, (h, u) in zip(blocks, kept):
        for p in b.mlp_in:
            put(p, _sliced(mods[p], rows=u))
        put(b.mlp_out, _sliced(mods[b.mlp_out], cols=u))
        if h is not None:
            span = b.group * b.head_dim  # a unit's query / output dimensions; its key / value ones are head_dim
            qo = (h[:, None] * span + torch.arange(span, device=h.device)[None, :]).flatten()
            kv = (h[:, None] * b.head_dim + torch.arange(b.head_dim, device=h.device)[None, :]).flatten()
            put(b.attn["q"], _sliced(mods[b.attn["q"]], rows=qo))
            for k in "kv":
                put(b.attn[k], _sliced(mods[b.attn[k]], rows=kv))
            put(b.attn["o"], _sliced(mods[b.attn["o"]], cols=qo))
            owner = mods[b.attn["q"].rsplit(".", 1)[0]]
            for holder in (owner, mods[b.mlp_out.rsplit(".", 1)[0]]):
                if hasattr(holder, "heads"):  # TinyGPT counts its heads; transformers' views infer them
                    holder.heads = len(h) * b.group


class WidthOptions(OneShotOptions):
    """``prune_width``'s settings (the search's are :class:`~de_plugin.lm.search.OneShotOptions`')."""

    allocation: Literal["search", "uniform"] = Field("search", description="searched per-block widths, or uniform")
    search_strategy: Optional[str] = Field(
        "evopress", pattern="^(de|random|evopress|guided)$",
        description="'evopress': (1 + lambda) from the best so far, level-switch mutations (lambda = population); "
                    "'de': differential evolution; 'random': the control; all at the same evaluations")
    heads: bool = Field(True, description="prune attention heads too (with grouped-query attention: a key / value "
                                           "head and its query heads together)")
    min_share: float = Field(0.05, gt=0.0, le=1.0, description="the least share of a block's heads / units kept")
    # chosen by benchmarks/llm.py (TinyGPT, 3 seeds, 30% of the parameters): the refit lowered held-out perplexity to
    # 0.80x with uniform width and 0.84x with the searched one, at twice the search's time
    refit: Optional[Union[bool, Literal["final"]]] = Field(
        None, description="re-fit each pruned o / down projection's kept columns and bias by least squares to the "
                          "dense layer's output on the calibration tokens. True: in the search's candidates too (holds "
                          "every o / down input's d x d second moment; one d x d solve per block and candidate); "
                          "'final': the search scores without it and the final widths are re-fitted with at most "
                          f"{REFIT_AUTO_BYTES >> 20} MiB of moments in memory at a time (one partial calibration pass "
                          "per run of layers); False: none. None: True while all the moments take at most "
                          f"{REFIT_AUTO_BYTES >> 20} MiB (float64), else 'final'")

    @model_validator(mode="after")
    def _no_guide(self) -> "WidthOptions":
        if self.search_strategy == "guided":
            raise ValueError("search_strategy='guided' estimates the KL of removing single weights, which has no "
                             "counterpart for whole heads and units: use 'evopress' (the default), 'de' or 'random'")
        return self


def refit_mode(o: "WidthOptions", blocks: list[WidthBlock], mods: dict[str, nn.Module]) -> Union[bool, str]:
    """``refit`` as asked, or (None) True while every o / down input's moments fit :data:`REFIT_AUTO_BYTES`,
    else ``"final"``."""
    if o.refit is not None:
        return o.refit
    need = sum(moment_bytes(mods[p]) for b in blocks for p in b.outputs)
    if need <= REFIT_AUTO_BYTES:
        return True
    log.info("prune_width: the search scores widths without the refit (the o / down inputs' second moments would "
             "take %.1f GiB); the final widths are re-fitted a run of layers at a time (refit=True: in the search "
             "too)", need / 2 ** 30)
    return "final"


@dataclass
class WidthResult(OneShotResult):
    """What ``prune_width`` did; ``model`` is physically smaller."""

    heads: list[int]  # query heads kept per block (the original count where heads were not pruned)
    units: list[int]  # hidden units kept per block
    params_before: int
    params_after: int
    #: the kept o / down columns and biases re-fitted: True (in the search too), "final" (the final widths only), False
    refit: Union[bool, str] = field(default=False, kw_only=True)

    @property
    def removed(self) -> float:
        return 1.0 - self.params_after / self.params_before


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"params must be the share of the decoder's Linear parameters to remove, in (0, 1) "
                         f"(0.3 removes 30%), got {ratio!r}")
    return float(ratio)


def _seeds(space: WidthSpace, ratio: float, budget: int, heads: bool) -> dict[str, np.ndarray]:
    nh = len(space.hb)
    uniform = np.full(len(space.numels), 1.0 - ratio)
    out = {"uniform": space.project(uniform, budget)}
    if heads and nh:
        out["mlp_only"] = space.project(np.concatenate([np.ones(nh), uniform[nh:]]), budget)
    return out


def prune_width(model: nn.Module, calibration: Any, params: float, options: Optional[WidthOptions] = None, *,
                seed: int = 0, inplace: bool = False, progress: bool = True, **kwargs: Any) -> WidthResult:
    """Remove the share ``params`` of the decoder's Linear parameters as whole heads and hidden units,
    the width of each block searched (or uniform); returns the sliced, smaller model."""
    o = options_from(WidthOptions, "prune_width", options, kwargs)
    batches, ratio = check_tokens(calibration), _check_ratio(params)
    width_blocks(model)  # refuses an unknown block layout before any work
    start = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    with undone_on_error(model, inplace):
        was = work.training
        work.eval()
        blocks = width_blocks(work)
        if not o.heads:
            for b in blocks:
                b.attn, b.head_cost = {}, 0
        mods = dict(work.named_modules())
        probes = [LMLayer(p, mods[p], b.index, False) for b in blocks for p in b.outputs]
        refits = refit_mode(o, blocks, mods)
        stats = collect_stats(work, probes, batches, hessians=refits is True)
        moments = ({l.name: (stats.hessians[i], stats.sums[i], stats.tokens) for i, l in enumerate(probes)}
                   if refits is True else None)
        masks = WidthMasks(work, blocks, {l.name: stats.norms(i) for i, l in enumerate(probes)}, moments)
        before = decoder_params(work)
        fixed = before - sum(b.heads * b.head_cost * bool(b.attn) + b.units * b.unit_cost for b in blocks)
        space = WidthSpace(blocks, fixed, o.min_share)
        budget = int(round(before * (1.0 - ratio)))
        seeds = _seeds(space, ratio, budget, o.heads)
        ref = DenseReference(work, batches)
        full = fitness_fn(ref, o.fitness)
        info, evals = {}, 0
        if o.allocation == "search":
            counts, info, evals = search_counts(work, masks, ref, space, budget, seeds, o, seed, progress)
        else:
            counts = seeds["uniform"]
        seed_fitness = {k: reported(score_counts(masks, work, full, c), o.fitness) for k, c in seeds.items()}
        value = reported(score_counts(masks, work, full, counts), o.fitness)
        fitted = None
        if refits == "final":
            info["fitness_before_refit"] = value
            fitted = refit_streamed(work, masks, probes, batches, counts, REFIT_AUTO_BYTES)
        kept = masks.kept(counts)
        masks.apply(counts, fitted=fitted)  # the kept columns as scored (re-fitted with refit): slicing keeps them
        if fitted is not None:
            value = reported(full(work), o.fitness)
        slice_width(work, blocks, kept)
        work.train(was)
        result = WidthResult(model=work, allocation=o.allocation, fitness=value, seed_fitness=seed_fitness,
                             evaluations=evals, seconds=time.perf_counter() - start, search=info,
                             heads=[(len(h) if h is not None else b.heads) * b.group for b, (h, _) in zip(blocks, kept)],
                             units=[len(u) for _, u in kept], params_before=before, params_after=decoder_params(work),
                             refit=refits)
        log.info("prune_width: %s, %.1f%% of the decoder's parameters removed, %s %.4f (uniform %.4f)", o.allocation,
                 100 * result.removed, o.fitness, result.fitness, result.seed_fitness["uniform"])
        return result
