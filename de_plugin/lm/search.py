"""``prune_lm``: one-shot pruning of a causal language model with a searched per-layer sparsity.

No fine-tuning follows, so the fitness the search scores (KL divergence of the pruned model's
next-token distribution from the dense one's on calibration tokens) is the outcome itself. The search
is the project's :class:`~de_plugin.search.allocator.Allocator` (``search_strategy``: EvoPress-style (1 + lambda)
level switching with its switches ranked by a Taylor estimate of the KL (``guided``, the default where that
estimate fits in memory) or drawn at random (``evopress``), differential evolution, or random allocations, at
equal evaluations)
over per-layer (or per-block) sparsities projected onto the exact global budget, seeded with the
uniform and OWL allocations. It scores on the first ``search_batches`` calibration batches; its
``finalists`` best and both seeds are then re-scored on all of them and the best is kept, so the
result is never worse than uniform or OWL on the calibration KL.
"""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from ..evaluation import SerialBackend, backend_round
from ..options import options_from
from ..pruner import Undo
from ..search.allocator import Guide, KeepSpace, Screen, SearchOptions, population_for, start_search
from ..search.budget import total_keep
from .allocations import owl_counts, uniform_counts
from .calibration import check_tokens, collect_hessians, collect_stats
from .database import LayerDatabase, SequentialPruning
from .fitness import DenseReference, perplexity
from .inlayer import check_nm
from .sensitivity import BACKWARD_COST, TaylorGuide, fisher_counts, fisher_diagonal
from .targets import LMLayer, decoder_layers

log = logging.getLogger("de_plugin")
#: below this many tokens per candidate, noise starts to rank candidates (a warning says so)
MIN_SEARCH_TOKENS = 1000
#: ``search_strategy=None`` is 'guided' while its estimate takes at most this many bytes at GUIDE_BYTES_PER_WEIGHT
#: a searched weight, else 'evopress' (a 7B model's would take about 110 GB beside the search's own 40 GB).
#: benchmarks/lm_memory.py: 40.1 bytes per decoder weight beyond the model for the guided Wanda search against 23.2
#: with random switches (the gradient and the Fisher in float32, autograd's own gradient, the profiles' temporaries)
GUIDE_AUTO_BYTES, GUIDE_BYTES_PER_WEIGHT = 4 << 30, 16
#: the default search's evaluations (``generations=None``): this many, or this many per searched value, whichever is more
DEFAULT_EVALS, EVALS_PER_VALUE = 832, 26


def default_generations(o: "OneShotOptions", dim: int) -> int:
    """``o.generations``, or (None) as many as :data:`DEFAULT_EVALS` / :data:`EVALS_PER_VALUE` evaluations take."""
    if o.generations is not None:
        return o.generations
    pop = population_for(o.population, dim, o.search_strategy)
    return math.ceil(max(DEFAULT_EVALS, EVALS_PER_VALUE * dim) / pop) - 1


class OneShotOptions(SearchOptions):
    """The search settings ``prune_lm`` and ``prune_width`` share (the allocator's own are :class:`SearchOptions`')."""

    fitness: Literal["kl", "perplexity"] = Field("kl", description="what a candidate scores on calibration tokens")
    # chosen by benchmarks/llm.py (TinyGPT, 8 x 128-token batches): one batch per candidate ranked candidates as
    # well as four at the same evaluations; the tokens saved buy 4x the generations, which is what the search lacks
    search_batches: Optional[int] = Field(
        1, ge=1, description="calibration batches each candidate is scored on (None: half of them); the finalists "
                             "are re-scored on all. Give batches of at least ~1,000 tokens, or raise this")
    finalists: int = Field(4, ge=1, description="the search's best candidates re-scored on all calibration batches")
    # chosen by benchmarks/llm.py (TinyGPT, Wanda, 70%): at equal evaluations the (1 + lambda) level-switch
    # search beat DE and random allocations, and fewer offspring per generation (more generations) did better;
    # ranking its level switches by the Taylor estimate ('guided') beat drawing them at random on the 4-, 6- and
    # 12-block TinyGPTs in every cell (0.957x-0.990x), and matched it with a quarter of the evaluations
    search_strategy: Optional[str] = Field(
        None, pattern="^(de|random|evopress|guided)$",
        description="'evopress': (1 + lambda) from the best so far, level-switch mutations (lambda = population); "
                    "'guided' (prune_lm, granularity='layer'): the same, its offspring the level switches a "
                    "second-order estimate of the KL ranks best; 'de': differential evolution; 'random': the "
                    "control; all at the same evaluations. None: 'guided' where it applies and its estimate "
                    f"({GUIDE_BYTES_PER_WEIGHT} bytes a searched weight) takes at most {GUIDE_AUTO_BYTES >> 30} GiB, "
                    "else 'evopress'")
    population: Optional[int] = Field(4, ge=4, description="offspring per generation (evopress) or DE's population")
    survivors: int = Field(
        0, ge=0, description="evopress: screen each generation's offspring on one calibration batch and score only "
                             "this many best on the search batches (EvoPress's multi-step selection); 0: score every "
                             "offspring on the search batches")
    # chosen by benchmarks/llm.py: 832 evaluations are converged on a 24-layer decoder (16x more gained 1.6%); on a
    # 72-layer one 4x more still gained 6% (0.706x -> 0.665x OWL's perplexity): the budget grows with the layers
    generations: Optional[int] = Field(
        None, ge=0, description="search generations (evaluations: population x (generations + 1)). None: "
                                f"{DEFAULT_EVALS} evaluations, or {EVALS_PER_VALUE} per searched value (layer, block "
                                f"or width) where there are more than {DEFAULT_EVALS // EVALS_PER_VALUE}")
    stall: Optional[int] = Field(0, ge=0, description="DE: stop after this many generations without improvement (0: never)")

    @model_validator(mode="after")
    def _survivors_fit(self) -> "OneShotOptions":
        if self.survivors and self.search_strategy not in (None, "evopress"):
            raise ValueError(f"survivors={self.survivors} is EvoPress's multi-step selection, which only "
                             f"search_strategy='evopress' has: leave survivors=0 with {self.search_strategy!r}")
        if self.population is not None and self.survivors > self.population:
            raise ValueError(f"survivors={self.survivors} is more than the offspring screened per generation "
                             f"(population={self.population}): lower survivors or raise population")
        return self


class LMOptions(OneShotOptions):
    """``prune_lm``'s settings."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field("wanda", description="the mask inside each layer")
    allocation: Literal["search", "uniform", "owl", "fisher"] = Field(
        "search", description="per-layer sparsities: searched, the same everywhere, OWL's outlier-weighted rule, or "
                              "the least total curvature-weighted cost (``fisher``: no search)")
    fisher_seed: bool = Field(
        False, description="search: also start from the curvature-weighted allocation (diagonal Fisher x squared "
                           "removed weights per layer; one backward pass per search batch, counted as "
                           f"{BACKWARD_COST} evaluations' worth each and taken from the search's budget)")
    granularity: Literal["layer", "block"] = Field(
        "layer", description="search one sparsity per Linear layer, or one per decoder block")
    span: float = Field(0.3, gt=0.0, le=1.0, description="how far a layer's sparsity may move from the target")
    level_step: float = Field(0.05, gt=0.0, lt=0.5, description="sparsegpt: the database's level spacing")
    owl_m: float = Field(5.0, gt=0.0, description="OWL: a score is an outlier above this multiple of the mean")
    owl_lambda: float = Field(0.08, ge=0.0, lt=0.5, description="OWL: the largest density shift of a block")
    sequential: bool = Field(
        False, description="prune the final model block by block, each block's statistics taken with the blocks "
                           "before it already pruned (the SparseGPT / Wanda papers' order; one partial calibration "
                           "pass per block); the search itself scores on dense statistics either way")

    @model_validator(mode="after")
    def _guided_per_layer(self) -> "LMOptions":
        if self.search_strategy == "guided" and self.granularity != "layer":
            raise ValueError("search_strategy='guided' moves weights between single layers: use granularity='layer' "
                             "with it, or search_strategy='evopress' with granularity='block'")
        return self


class BlockSpace(KeepSpace):
    """One sparsity per decoder block, shared by its layers; the budget projection keeps the shape."""

    repairs = False

    def __init__(self, numels, min_keep, max_keep, bounds, block_of: np.ndarray):
        super().__init__(numels, min_keep, max_keep, bounds)
        self.block_of = np.asarray(block_of)

    def to_counts(self, x: np.ndarray) -> np.ndarray:
        d = 1.0 - np.asarray(x)[self.block_of]
        return np.clip(np.round(d * self.numels).astype(np.int64), self.min_keep, self.max_keep)

    def to_x(self, counts: np.ndarray) -> np.ndarray:
        kept = np.bincount(self.block_of, weights=counts)
        return 1.0 - kept / np.bincount(self.block_of, weights=self.numels)

    def project(self, x: np.ndarray, budget: int) -> np.ndarray:
        return self.fit(1.0 - np.asarray(x)[self.block_of], budget, is_density=True)


@dataclass
class OneShotResult:
    """What a one-shot call did: the pruned model, how its allocation was chosen and what it scores."""

    model: nn.Module
    allocation: str
    #: the final model's fitness on all calibration batches (KL, or perplexity with fitness='perplexity')
    fitness: float
    #: the same measure for the seeds (uniform, OWL / MLP-only) on the same batches
    seed_fitness: dict[str, float] = field(default_factory=dict, kw_only=True)
    evaluations: int = field(default=0, kw_only=True)
    seconds: float = field(default=0.0, kw_only=True)
    search: dict[str, Any] = field(default_factory=dict, kw_only=True)


@dataclass
class LMPruningResult(OneShotResult):
    """What ``prune_lm`` did: the pruned model and the numbers that describe it."""

    layers: list[str]
    #: each layer's decoder block and size, and the weights it keeps, in ``layers`` order
    blocks: list[int]
    numels: list[int]
    kept: list[int]
    layer_sparsity: dict[str, float]
    sparsity: float
    method: str

    def block_sparsity(self) -> list[float]:
        """One sparsity per decoder block (weights pruned / weights in its targets), in block order: the
        per-layer list llm-compressor's SparseGPT / Wanda modifiers take as ``sparsity``."""
        out = []
        for b in sorted(set(self.blocks)):
            idx = [i for i, x in enumerate(self.blocks) if x == b]
            out.append(1.0 - sum(self.kept[i] for i in idx) / sum(self.numels[i] for i in idx))
        return out

    def modifier_targets(self) -> dict[str, list]:
        """The per-layer allocation as llm-compressor's SparseGPT / Wanda modifiers take it: every pruned
        Linear layer its own target (an exact-name pattern) and its sparsity, in the model's module order,
        which is the order the modifier pairs them in: ``WandaPruningModifier(**result.modifier_targets(),
        ignore=["re:.*lm_head"])``. (``block_sparsity()`` is the per-block list, with the decoder layers as
        targets.)"""
        names = set(self.layers)
        order = [n for n, _ in self.model.named_modules() if n in names]
        return {"targets": [f"re:^{re.escape(n)}$" for n in order], "sparsity": [self.layer_sparsity[n] for n in order]}

    def table(self) -> str:
        """A readable per-layer table."""
        rows = [f"{'layer':<48} {'weights':>10} {'sparsity':>9}"]
        rows += [f"{n:<48} {m:>10} {s:>9.3f}" for n, m, s in zip(self.layers, self.numels,
                                                              self.layer_sparsity.values())]
        rows.append(f"{'total':<48} {sum(self.numels):>10} {self.sparsity:>9.3f}")
        return "\n".join(rows)


def _check(model: nn.Module, calibration: Any, sparsity: Any) -> tuple[list[torch.Tensor], Optional[float],
                                                                       Optional[tuple[int, int]], list[LMLayer]]:
    """Everything wrong with the call, raised before any work."""
    batches = check_tokens(calibration)
    nm = None
    if isinstance(sparsity, str):
        try:
            n, m = (int(v) for v in sparsity.split(":"))
        except ValueError:
            raise ValueError(f"sparsity {sparsity!r}: give a fraction in (0, 1) such as 0.7, or N:M such as '2:4'") from None
        nm, sparsity = (n, m), None
    elif isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a fraction in (0, 1) (0.7 prunes 70% of the decoder's Linear weights) "
                         f"or N:M such as '2:4', got {sparsity!r}")
    layers = decoder_layers(model)
    for l in layers:
        check_nm(nm, l.in_features, l.name)
    return batches, (None if sparsity is None else float(sparsity)), nm, layers


def fitness_fn(ref: DenseReference, kind: str):
    """The score a candidate maximises on the first ``upto`` reference batches (or those numbered in
    ``pick``): -KL or -log perplexity."""
    def score(model: nn.Module, upto: Optional[int] = None, pick: Optional[Sequence[int]] = None) -> float:
        if kind == "kl":
            return -ref.kl(model, upto, pick)
        return -math.log(perplexity(model, [ref.batches[i] for i in pick] if pick is not None else ref.batches[:upto]))
    score.ref = ref
    return score


class LMScorer:
    """The search's :class:`~de_plugin.evaluation.Scorer`: a candidate's counts written from the
    database, scored on the search's calibration batches."""

    def __init__(self, model: nn.Module, db: Any, score, upto: int):
        self.model, self.db, self.fn, self.upto = model, db, score, upto
        self.batches = 0  # calibration batches forwarded: the search's cost

    def at(self, counts: Sequence[int], upto: Optional[int]) -> float:
        """The score of ``counts`` on the first ``upto`` batches (all: None); the model is restored after."""
        try:
            self.db.apply(counts)
            self.batches += upto or len(self.fn.ref.batches)
            return self.fn(self.model, upto)
        finally:
            self.db.restore()

    def reset(self) -> None:
        """The database holds the dense weights; nothing to take."""

    def score(self, counts: Sequence[int], floor: Optional[float] = None) -> float:
        self.db.apply(counts)
        self.batches += self.upto
        return self.fn(self.model, self.upto)

    def restore(self) -> None:
        self.db.restore()

    def full(self, counts: Sequence[int]) -> float:
        """The score on every calibration batch (the finalists' re-scoring)."""
        return self.at(counts, None)

    def screen(self, counts: Sequence[int], generation: int) -> float:
        """The cheap score of EvoPress's multi-step selection: one calibration batch, the next one each
        generation (all calibration batches take turns, so the screening does not fit the search batches)."""
        try:
            self.db.apply(counts)
            self.batches += 1
            return self.fn(self.model, pick=[generation % len(self.fn.ref.batches)])
        finally:
            self.db.restore()


def _space(layers: Sequence[LMLayer], sparsity: float, o: LMOptions) -> KeepSpace:
    numels = np.array([l.numel for l in layers], dtype=np.int64)
    lo, hi = max(0.0, sparsity - o.span), min(0.99, sparsity + o.span)
    min_keep = np.floor(numels * (1.0 - hi)).astype(np.int64)
    max_keep = np.ceil(numels * (1.0 - lo)).astype(np.int64)
    if o.granularity == "block":
        blocks = sorted({l.block for l in layers})
        block_of = np.array([blocks.index(l.block) for l in layers])
        return BlockSpace(numels, min_keep, max_keep, [(lo, hi)] * len(blocks), block_of)
    return KeepSpace(numels, min_keep, max_keep, [(lo, hi)] * len(layers))


def resolved_strategy(o: "LMOptions", layers: Sequence[LMLayer]) -> str:
    """``o.search_strategy``, or (None) 'guided' where it applies (per-layer granularity, no ``survivors``, the
    estimate within :data:`GUIDE_AUTO_BYTES`), else 'evopress' (said in the log where only memory decided)."""
    if o.search_strategy is not None:
        return o.search_strategy
    if o.granularity != "layer" or o.survivors:
        return "evopress"
    need = GUIDE_BYTES_PER_WEIGHT * sum(l.numel for l in layers)
    if need <= GUIDE_AUTO_BYTES:
        return "guided"
    log.info("prune_lm: search_strategy 'evopress' (the guided search's estimate would take %.1f GiB; "
             "search_strategy='guided' asks for it)", need / 2 ** 30)
    return "evopress"


def search_batch_count(o: OneShotOptions, available: int) -> int:
    """How many calibration batches a candidate is scored on (``search_batches``; None: half, at least one)."""
    return o.search_batches or max(1, available // 2)


def search_counts(model: nn.Module, db, ref: DenseReference, space: KeepSpace, budget: int,
                  seeds: dict[str, np.ndarray], o: "LMOptions", seed: int,
                  progress: bool, guide: Optional[Guide] = None) -> tuple[np.ndarray, dict[str, Any], int]:
    """The searched counts, the search's record and its evaluations (finalists' re-scoring included).
    ``db`` writes a candidate's counts into the model (``apply``) and takes them out (``restore``);
    ``guide``: what ``search_strategy='guided'`` ranks its moves by."""
    upto = search_batch_count(o, len(ref.batches))
    tokens = sum(b.numel() for b in ref.batches[:upto])
    if tokens < MIN_SEARCH_TOKENS:
        log.warning("the search scores each candidate on %d calibration tokens (search_batches=%d): few enough for "
                    "noise to rank candidates; give longer or larger batches, or raise search_batches", tokens, upto)
    scorer = LMScorer(model, db, fitness_fn(ref, o.fitness), upto)
    o = o.model_copy(update={"generations": default_generations(o, len(space.bounds))})
    backend = SerialBackend(scorer)
    rng = np.random.default_rng(seed)
    search, solver = start_search(backend, o, rng, space, list(seeds.values()), o.max_evals, progress=progress)
    screen = (Screen(scorer.screen, solver.popsize, o.survivors, 1.0 / upto)
              if o.survivors and o.search_strategy == "evopress" else None)
    with backend_round(backend):
        best = search.maximise(solver, space, budget, desc=f"search ({getattr(o, 'method', 'width')})",
                               rescore=scorer.full, top=o.finalists, include=list(seeds.values()), screen=screen,
                               guide=guide)
    info = search.info(solver)
    info["finalists"] = len(search.rescored)
    info["batches_forwarded"] = scorer.batches
    return best, info, int(math.ceil(scorer.batches / upto))


def prune_lm(model: nn.Module, calibration: Any, sparsity: "float | str", options: Optional[LMOptions] = None, *,
             seed: int = 0, inplace: bool = False, progress: bool = True, **kwargs: Any) -> LMPruningResult:
    """Prune a causal language model's decoder Linear layers in one shot, no retraining.

    ``calibration``: token batches (``[batch, length]`` ids); ``sparsity``: a fraction of the decoder's
    Linear weights (per-layer sparsities chosen by ``allocation``) or ``"2:4"`` (N:M in every layer; no
    allocation to choose). Options as keywords or one :class:`LMOptions`. The user's model is left as
    it is unless ``inplace`` (a copy of a large model is what ``inplace`` avoids)."""
    o = options_from(LMOptions, "prune_lm", options, kwargs)
    batches, frac, nm, _ = _check(model, calibration, sparsity)
    start = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    with undone_on_error(model, inplace):
        layers = decoder_layers(work)
        o = o.model_copy(update={"search_strategy": resolved_strategy(o, layers)})
        was_training = work.training
        work.eval()
        stats = (collect_hessians(work, layers, batches) if o.method == "sparsegpt"
                 else collect_stats(work, layers, batches))
        db = LayerDatabase(layers, stats, o.method, nm=nm, level_step=o.level_step)
        ref = DenseReference(work, batches)
        full = fitness_fn(ref, o.fitness)
        numels = np.array([l.numel for l in layers], dtype=np.int64)
        seeds, info, evals = {}, {}, 0
        if nm is not None:
            counts, name = numels // nm[1] * (nm[1] - nm[0]), f"{nm[0]}:{nm[1]}"
        else:
            seeds = {"uniform": uniform_counts(layers, frac),
                     "owl": owl_counts(layers, stats, frac, o.owl_m, o.owl_lambda)}
            name, space = o.allocation, _space(layers, frac, o)
            if o.allocation == "fisher" or (o.allocation == "search" and o.fisher_seed):
                seeds["fisher"], evals = curvature_seed(work, layers, db, batches, space, frac, o, seed)
            if o.allocation == "search":
                guide = None
                if o.search_strategy == "guided":  # the dense Fisher, once: its backward passes are the search's
                    guide = TaylorGuide(work, layers, db, ref, search_batch_count(o, len(batches)), seed=seed)
                    evals += guide.cost
                budget = o.max_evals - evals if o.max_evals is not None else None
                counts, info, searched = search_counts(work, db, ref, space, total_keep(space.numels, frac), seeds,
                                                       o.model_copy(update={"max_evals": budget}), seed, progress,
                                                       guide)
                evals += searched
                if guide is not None:  # the estimates' backward passes, at the parents the search moved to
                    info["estimates"] = guide.made
                    evals += guide.made * guide.cost
            else:
                counts = seeds[o.allocation]
        final = SequentialPruning(db, work, batches) if o.sequential else db
        seed_fitness = {k: score_counts(final, work, full, c) for k, c in seeds.items()}
        final.apply(counts, exact=True)
        value = full(work)
        best_seed = max(seed_fitness, key=seed_fitness.get, default=None)
        if o.allocation == "search" and best_seed is not None and seed_fitness[best_seed] > value:
            # the search scored SparseGPT at the database's levels; pruned at the exact counts a seed can come out
            # ahead of the allocation chosen there: then the seed is the result (never worse than uniform or OWL)
            log.info("prune_lm: %s at the exact counts scores better than the searched allocation; keeping it",
                     best_seed)
            final.restore()
            counts, value, info["kept_seed"] = seeds[best_seed], seed_fitness[best_seed], best_seed
            final.apply(counts, exact=True)
        work.train(was_training)
        kept = [int((l.weight != 0).sum()) for l in layers]
        fitness = reported(value, o.fitness)
        seed_fitness = {k: reported(v, o.fitness) for k, v in seed_fitness.items()}
        result = LMPruningResult(
            model=work, allocation=name, fitness=fitness, seed_fitness=seed_fitness, evaluations=evals,
            seconds=time.perf_counter() - start, search=info, layers=[l.name for l in layers],
            blocks=[l.block for l in layers], numels=numels.tolist(), kept=kept,
            layer_sparsity={l.name: 1.0 - k / l.numel for l, k in zip(layers, kept)},
            sparsity=1.0 - sum(kept) / float(numels.sum()), method=o.method)
        log.info("prune_lm: %s, %s inside layers, sparsity %.4f, %s %.4f (uniform %s)", name, o.method,
                 result.sparsity, o.fitness, fitness, f"{seed_fitness.get('uniform', float('nan')):.4f}")
        return result


def curvature_seed(model: nn.Module, layers: Sequence[LMLayer], db: LayerDatabase, batches: Sequence[torch.Tensor],
                   space: KeepSpace, sparsity: float, o: LMOptions, seed: int) -> tuple[np.ndarray, int]:
    """The curvature-weighted allocation (:mod:`.sensitivity`) from the search's calibration batches, and
    what its backward passes cost in evaluations (forward passes over those batches)."""
    upto = search_batch_count(o, len(batches))
    fisher = fisher_diagonal(model, layers, batches[:upto], seed=seed)
    counts = fisher_counts(db, fisher, space.numels, total_keep(space.numels, sparsity), space.min_keep,
                           space.max_keep)
    return counts, BACKWARD_COST


@contextmanager
def undone_on_error(model: nn.Module, inplace: bool) -> Iterator[None]:
    """Pruning in place: the user's weights as they were if anything fails on the way (the core's ``Undo``)."""
    snapshot = Undo(model, spill=False) if inplace else None
    try:
        yield
    except BaseException:
        if snapshot is not None:
            snapshot.restore(model)
        raise


def reported(value: float, kind: str) -> float:
    """A search score (maximised) as the user reads it: KL, or perplexity."""
    return -value if kind == "kl" else math.exp(-value)


def score_counts(db: Any, model: nn.Module, score, counts: np.ndarray) -> float:
    """``score(model)`` with ``counts`` written in by ``db`` (exactly), the dense weights back after."""
    try:
        db.apply(counts, exact=True)
        return score(model)
    finally:
        db.restore()

