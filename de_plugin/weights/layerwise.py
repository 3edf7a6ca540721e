"""``de_layerwise``: differential evolution over per-layer pruning thresholds (Wu et al. 2021).

Each round, DE searches one value per prunable layer jointly; magnitude pruning is applied
inside each layer; the round runner (:mod:`de_plugin.runner`) then fine-tunes (with recovery) and
moves to the next round. The design (docs/ALGORITHMS.md, section 1): search in small steps, each round
re-allocating over the fine-tuned weights, with the population seeded by the baselines' allocations,
so the search starts from everything the heuristics give. How it compares with them after
fine-tuning is measured, not assumed: BENCHMARKS.md.

Parametrisations (``parametrization``):
* ``ratio`` (default): ``x_l`` is layer l's sparsity;
* ``std``: layer l keeps ``|w| > x_l * std(W_l)`` (Han et al.'s quality parameter).

Fitness:
* budget form: every candidate is projected onto the exact budget (its per-layer density shape
  scaled by one factor), then scored by validation accuracy; DE maximises it;
* accuracy form: minimise the kept fraction subject to
  ``acc_val >= reference - search_drop`` (Deb's feasibility rules), or the penalty
  ``a (1 - acc) + (1 - a) density`` with ``fitness="penalty"``. ``search_drop`` bounds the drop
  *before* fine-tuning; the loop then checks ``max_accuracy_drop`` after fine-tuning.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from . import allocation
from ..search.allocator import Allocator, KeepSpace, SearchOptions, StdSpace, population_for, search_state, start_search
from ..search.de import DifferentialEvolution
from .magnitude import MagnitudeScorer
from ..evaluation import backend_round, batch_norms, check_device, low_memory_for, make_backend
from ..search.grouping import NAMED, GroupedSpace, resolve_groups, search_dim
from ..metrics import accuracy
from ..targets import Target
from ..hookspecs import hookimpl
from .rounds import IterativeOptions, IterativePruner, State
from ..pruner import Context
from .lookahead import next_keep, next_round_score
from .recovery import finetune_round
from ..search.selection import RetrainedMeasure, capped, check_finalists, choose, uninformative
from ..result import Outcome

log = logging.getLogger("de_plugin")


class LayerwiseOptions(IterativeOptions, SearchOptions):
    # chosen by the recovery ablation on validation accuracy (BENCHMARKS.md): splicing > none > random
    recovery: str = Field("splicing", pattern="^(none|random|splicing)$")
    time_limit: Optional[float] = Field(None, gt=0, description="seconds for all searches; DE stops early")
    parametrization: str = Field("ratio", pattern="^(ratio|std)$")
    max_std: float = Field(4.0, gt=0, description="std parametrisation: upper bound of x_l")
    fitness: str = Field("feasibility", pattern="^(feasibility|penalty)$")
    penalty_weight: float = Field(0.5, ge=0.0, le=1.0, description="a in a*(1-acc)+(1-a)*density")
    search_drop: float = Field(0.03, gt=0.0, lt=1.0, description="accuracy form: allowed drop before fine-tuning")
    sensitivity_scan: bool = Field(True, description="per-layer sensitivity scan in the first round (warm start)")
    scan_levels: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    device: Optional[str] = Field(None, description="move the working copy here (e.g. 'cuda')")
    low_memory: Optional[bool] = Field(
        None, description="hold ~5-8 bytes per searched weight instead of ~15-19 (measured): no magnitude ranks (masks by "
                          "selection, the same masks, slower per candidate), prune(inplace=True)'s undo copy on disk; "
                          "None: on above 50M searched weights")
    groups: Union[int, str, dict[str, Union[str, list[str]]]] = Field(
        "layer", description="one DE value per group of layers: 'layer' (none), 'stage', 'block', 'type', "
                             "an integer n (n runs of consecutive layers) or {name: [layer patterns]}")
    group_offset: float = Field(0.05, ge=0.0, le=1.0,
                                description="grouped search: bounded per-layer offsets (+-, in x units); 0: none")
    # the cost ablation (ResNet-20, 22 layers) found the same one-round pick without the scan, but over the
    # ladder the searches without it ended lower at 80% (one seed): the scan stays up to 32 layers
    scan_max_layers: int = Field(
        32, ge=1, description="without groups, skip the sensitivity scan above this many layers (it costs "
                              "len(scan_levels) evaluations per layer; the baseline seeds stand in for it)")
    # chosen by benchmarks/deep.py (ResNet-20): the un-retrained accuracy DE ranks by is near chance
    # on BN networks without it; with it the searched allocations lead at 90% and 95%
    adaptive_bn: Optional[bool] = Field(
        None, description="re-estimate BatchNorm statistics on bn_batches train_data batches before scoring each "
                          "candidate; None: on when the model has BatchNorm and train_data is given")
    bn_batches: int = Field(4, ge=1, description="adaptive BN: training batches per candidate")
    fidelity: Optional[float] = Field(
        None, gt=0.0, lt=1.0, description="multi-fidelity: share of the val_data batches (the first ones) that "
                                          "scores candidates during the search; the rescore_top best are then "
                                          "re-scored on all of val_data (budget form; needs val_data)")
    rescore_top: int = Field(4, ge=1, description="multi-fidelity: the search's best allocations that are finalists")
    # chosen by benchmarks/fitness.py: over sampled allocations of four models at 90% / 95%, accuracy after a
    # short fine-tune ranked them most like the final outcome (Spearman 0.81-0.96 in six of eight cells); the
    # un-retrained scores did worst on the ViT and MobileNetV2; benchmarks/selection.py measures the pick
    selection: Optional[str] = Field(
        None, pattern="^(holdout|search|finetune)$",
        description="how the round's allocation is chosen (budget form): 'holdout', the rescore_top best of the "
                    "search and every seed allocation (uniform, global, LAMP, ERK, the previous round's) scored on "
                    "the validation images the search did not score on (search_images), the best wins, so the search "
                    "cannot return less than the best seed there; 'finetune', then the `finalists` best of those "
                    "(and the best seed) each retrained for finalist_epochs with `finetune` (weights restored after) "
                    "and scored again, "
                    "the best wins (finalists x finalist_epochs extra epochs per round; needs finetune); 'search', "
                    "the rescore_top best re-scored on all of val_data, seeds not among them. None: 'finetune' when "
                    "`finetune` is given, else 'holdout'")
    finalists: int = Field(3, ge=1, description="selection='finetune': candidates retrained before the choice")
    finalist_epochs: int = Field(1, ge=1, description="selection='finetune': epochs each finalist is retrained for")
    finalist_steps: Optional[int] = Field(
        None, ge=1, description="selection='finetune': stop each finalist's retraining after this many training "
                                "batches (forward calls in train mode) within its finalist_epochs; on a large training "
                                "set a whole epoch per finalist costs more than the round's own fine-tune. None: "
                                "whole epochs")
    finalist_seeds: int = Field(1, ge=1, description="selection='finetune': the seed allocations (by the held-out "
                                                     "score) retrained besides the search's finalists: 1, the best "
                                                     "seed; more lets a heuristic that ranks lower before fine-tuning "
                                                     "win after it (one more epoch each)")
    selection_margin: float = Field(0.0, ge=0.0, le=1.0,
                                    description="selection='finetune': a search allocation replaces the best "
                                                "retrained seed only when its score after the short fine-tune is "
                                                "higher by more than this (score units: 0.005 = half a point of "
                                                "accuracy); 0, the plain best")
    # chosen by benchmarks/unseen.py (a digits CNN, 3 rounds; finalists then scored on their trained BN statistics): a
    # short fine-tune too short to recover the finalists ranked noise; with re-estimated statistics it applied in no
    # MobileNetV2 cell of benchmarks/selection.py (on the trained ones: every cell)
    selection_fallback: bool = Field(
        True, description="selection='finetune': when the short fine-tune lowers every finalist's score (it has not "
                          "recovered them yet, so it ranks noise), choose by their held-out scores before it instead "
                          "(a warning says so); False: always by the scores after it")
    # benchmarks/selection.py, MobileNetV2 at 95%: with the statistics a 25-step retraining leaves, every finalist
    # scored below its score before it (LAMP 12.7% -> 9.8%; re-estimated: 19.4%) and the choice fell back to noise
    finalist_adaptive_bn: bool = Field(
        True, description="selection='finetune', with adaptive BN on: re-estimate BatchNorm statistics on the "
                          "search's batches before scoring a retrained finalist, as the search scored it; False: "
                          "score with the running statistics the short retraining left (they lag its weights)")
    # measured by benchmarks/unseen.py (three digits models, 10-20 seeds): level with the default at every rung but
    # one (MobileNet at 90%, 20 seeds: +2.10 pp [+0.10, +4.10]), it removed the one collapse seen (ViT at 95%: 74.5% ->
    # 87.0% test); off until more than one comparison of thirteen shows it ahead of the default
    selection_lookahead: bool = Field(
        False, description="selection='finetune': also score each finalist of a round before the last one round "
                           "further: its retrained weights pruned on to the next round's keep (its own shape "
                           "scaled, and LAMP; the better counts), without training; the finalist with the best sum "
                           "of that and its short-fine-tune score wins. Guards against an allocation that recovers "
                           "best now but leaves the next round nothing that recovers (two evaluations a finalist)")
    search_images: Optional[int] = Field(
        500, ge=1, description="multi-fidelity by size (budget form, fidelity unset): when val_data holds more "
                                "images than this, the search scores candidates on its first batches holding "
                                "this many, and `selection` picks among the finalists; None: all of val_data")

    @field_validator("groups")
    @classmethod
    def _known_grouping(cls, v):
        if isinstance(v, str) and v not in NAMED:
            raise ValueError(f"unknown groups {v!r}; choose one of {NAMED}, an integer or a dict of name -> patterns")
        return v

    @field_validator("device")
    @classmethod
    def _device_exists(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            check_device(v)
        return v

    @model_validator(mode="after")
    def _steps_need_finetune_selection(self) -> "LayerwiseOptions":
        if self.finalist_steps is not None and self.selection in ("holdout", "search"):
            raise ValueError(f"finalist_steps={self.finalist_steps} caps the finalists' retraining, which only "
                             f"selection='finetune' does; with selection={self.selection!r} leave finalist_steps unset")
        if self.selection_lookahead and self.selection in ("holdout", "search"):
            raise ValueError(f"selection_lookahead=True scores the finalists of selection='finetune' one round "
                             f"further; with selection={self.selection!r} there are none: leave it False")
        return self


def check_search(o: LayerwiseOptions, model: nn.Module, targets: Sequence[Target], train_batches: Optional[list],
                 val_batches: Optional[list] = None, metric: Optional[Callable] = None) -> list[tuple[str, list[int]]]:
    """What can be known wrong before any work: the grouping, the population for the search's
    dimension, adaptive BN without training batches, multi-fidelity without validation batches.
    Returns the resolved groups."""
    if o.fidelity is not None and (not val_batches or len(val_batches) < 2 or metric is not accuracy):
        raise ValueError("fidelity scores candidates on part of the validation batches: pass val_data=[(x, y), ...] "
                         "with at least 2 batches and metric='accuracy' (not evaluate=), or leave fidelity unset")
    groups = resolve_groups(o.groups, targets, model)
    pop = population_for(o.population, search_dim(groups, len(targets), o.group_offset), o.search_strategy)
    check_finalists(o.rescore_top, pop, "rescore_top")
    check_finalists(o.finalists, pop, "finalists")
    has_bn = bool(batch_norms(model))
    if o.adaptive_bn:
        if not train_batches:
            raise ValueError("adaptive_bn=True re-estimates BatchNorm statistics on training batches: pass "
                             "train_data=[x, ...] (a few batches of training inputs) or set adaptive_bn=False")
        if not has_bn:
            log.warning("adaptive_bn=True but the model has no BatchNorm layer: nothing to re-estimate")
    elif o.adaptive_bn is None and has_bn and not train_batches:
        log.info("the model has BatchNorm: pass train_data (a few training batches) to score candidates with "
                 "re-estimated BN statistics (adaptive_bn), which ranks them better after heavy pruning")
    return groups


def magnitude_space(scorer: MagnitudeScorer, state: State, o: LayerwiseOptions,
                    groups: Sequence[tuple[str, list[int]]] = ()) -> KeepSpace:
    """The round's space, seen through ``groups`` when the search is grouped."""
    base = _layer_space(scorer, state, o)
    return GroupedSpace(base, [g for _, g in groups], o.group_offset) if groups else base


def _layer_space(scorer: MagnitudeScorer, state: State, o: LayerwiseOptions) -> KeepSpace:
    """The round's keep-count space: bounds from the layer limits, the ``std`` parametrisation from
    the scorer's snapshot of the round's weights (taken once by the backend)."""
    min_keep = state.min_keep(o.max_layer_sparsity)
    max_keep = np.maximum(state.max_keep(o.min_layer_sparsity), min_keep)
    if o.parametrization == "ratio":
        cur = 1.0 - max_keep / state.numels
        bounds = [(min(c, o.max_layer_sparsity), o.max_layer_sparsity) for c in cur]
        return KeepSpace(state.numels, min_keep, max_keep, bounds)
    sorted_mag = [torch.sort(w.abs().reshape(-1), descending=True, stable=True).values.cpu().numpy()
                  for w in scorer.w0]
    active = [w[w != 0] for w in scorer.w0]
    std = np.array([float(a.std()) if a.numel() > 1 else 1.0 for a in active])
    std[std <= 0] = 1.0
    return StdSpace(state.numels, min_keep, max_keep, [(0.0, o.max_std)] * len(scorer.w0), sorted_mag, std)


class DELayerwise(IterativePruner):
    """Differential-evolution layer-wise magnitude pruning (``de_layerwise``)."""

    name = "de_layerwise"
    Options = LayerwiseOptions
    needs_evaluate = True
    backend = None

    def check_targets(self, model: nn.Module, targets: Sequence[Target], train_batches: Optional[list],
                      val_batches: Optional[list] = None, metric: Optional[Callable] = None) -> None:
        check_search(self.options, model, targets, train_batches, val_batches, metric)

    def check_call(self, finetune: Optional[Callable], sparsity: Optional[float]) -> None:
        if self.options.selection == "finetune" and (finetune is None or sparsity is None):
            raise ValueError("selection='finetune' retrains each finalist of a budget-form search with your "
                             "`finetune` callable before choosing: pass finetune= and sparsity=, or use "
                             "selection='holdout'")

    def begin(self, ctx: Context, reference: Optional[float]) -> None:
        o = self.options
        self.check_call(ctx.finetune, ctx.sparsity)
        self.selection = o.selection or ("finetune" if ctx.finetune is not None and ctx.sparsity is not None
                                         else "holdout")
        self.groups = check_search(o, ctx.model, ctx.targets, ctx.train_batches, ctx.val_batches, ctx.metric)
        if o.device:
            ctx.model.to(o.device)
        self.ctx, self.reference = ctx, reference
        self._ranks: Optional[tuple[int, list]] = None  # (round, the round's magnitude ranks)
        self.sensitivity: dict[str, list[tuple[float, float]]] = {}
        self.deadline = None if o.time_limit is None else time.perf_counter() + o.time_limit
        # max_evals is shared over the rounds planned: the schedule's, or for an open-ended accuracy form 10
        budget_rounds = o.budget_rounds() if ctx.sparsity is not None else (o.rounds or 10) + o.patience
        self.scan_units = self._scan_units()
        scan_cost = len(self.scan_units) * len(o.scan_levels)
        pop = population_for(o.population, search_dim(self.groups, len(ctx.targets), o.group_offset), o.search_strategy)
        self.evals_per_round = None if o.max_evals is None else max(pop, (o.max_evals - scan_cost) // budget_rounds)
        self.rng = np.random.default_rng(ctx.seed)
        self.search_batches = search_batches = self._search_batches(ctx)
        scorer = MagnitudeScorer(ctx.model, ctx.targets, ctx.evaluate,
                                 *((ctx.val_batches, ctx.metric) if o.early_reject or search_batches else (None, None)),
                                 calib=ctx.train_batches if self._adaptive_bn(ctx) else None, bn_batches=o.bn_batches,
                                 search_batches=search_batches, low_memory=low_memory_for(o.low_memory, ctx.targets))
        val = ctx.val_batches if search_batches is None else ctx.val_batches[:search_batches]
        self.backend = make_backend(o.backend, scorer, o.workers, o.threads_per_worker, o.ray_address, val,
                                    ctx.metric, runtime_env=o.ray_runtime_env)

    def _search_batches(self, ctx: Context) -> Optional[int]:
        """Multi-fidelity: how many of the first ``val_data`` batches score candidates during the search
        (``fidelity`` as a share, else ``search_images`` by size in the budget form); None: all of them."""
        o, vb = self.options, ctx.val_batches
        if o.fidelity is not None:
            return max(1, round(o.fidelity * len(vb)))
        if o.search_images is None or ctx.sparsity is None or not vb or len(vb) < 2 or ctx.metric is not accuracy:
            return None
        seen = 0
        for k, (_, y) in enumerate(vb[:-1], 1):
            seen += len(y)
            if seen >= o.search_images:
                total = sum(len(b[1]) for b in vb)
                log.info("%s: the search scores candidates on the first %d of %d validation images "
                         "(search_images=%d); its %d best and the seed allocations are then compared on %s",
                         self.name, seen, total, o.search_images, o.rescore_top,
                         f"the other {total - seen}" if self.selection != "search" else "all of them")
                return k
        return None

    def _adaptive_bn(self, ctx: Context) -> bool:
        """Whether candidates are scored after re-estimating BatchNorm (the option, or ``None``: BN + train_data)."""
        if self.options.adaptive_bn is not None:
            return self.options.adaptive_bn
        return bool(ctx.train_batches) and bool(batch_norms(ctx.model))

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def checkpoint_state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "sensitivity": self.sensitivity}

    def restore_checkpoint_state(self, data: dict[str, Any]) -> None:
        self.rng.bit_generator.state = data["rng"]
        self.sensitivity = data["sensitivity"]

    def magnitude_ranks(self, round_index: int) -> Optional[list]:
        return self._ranks[1] if self._ranks is not None and self._ranks[0] == round_index else None

    def complete(self, outcome: Outcome) -> Outcome:
        if self.sensitivity and outcome.history:
            outcome.history[0]["sensitivity_scan"] = self.sensitivity
        return outcome

    # ---------------------------------------------------------------------- warm starts
    def _scan_units(self) -> list[tuple[str, list[int]]]:
        """What the sensitivity scan prunes one at a time: the groups, else each layer (none when off,
        or when there are more than ``scan_max_layers`` layers and no groups: the seeds stand in)."""
        o, targets = self.options, self.ctx.targets
        if not o.sensitivity_scan:
            return []
        if self.groups:
            return [(name, idx) for name, idx in self.groups]
        if len(targets) > o.scan_max_layers:
            log.info("%s: %d layers > scan_max_layers=%d: no sensitivity scan (the baseline seeds stand in; "
                     "groups='stage' scans per group)", self.name, len(targets), o.scan_max_layers)
            return []
        return [(t.name, [i]) for i, t in enumerate(targets)]

    def _scan(self, search: Allocator, space: KeepSpace, state: State) -> None:
        """Per-layer (or per-group) sensitivity: accuracy with only that unit pruned to each scan level."""
        base = state.counts.copy()
        jobs = []
        for name, idx in self.scan_units:
            for level in self.options.scan_levels:
                lv = min(level, self.options.max_layer_sparsity)
                counts, changed = base.copy(), False
                for i in idx:
                    k = int(round(state.numels[i] * (1.0 - lv)))
                    if k < base[i]:
                        counts[i], changed = max(k, int(space.min_keep[i])), True
                if not changed:
                    continue
                jobs.append((name, float(level), counts))
        log.info("%s: sensitivity scan, %d evaluations (%d units x %d levels)", self.name, len(jobs),
                 len(self.scan_units), len(self.options.scan_levels))
        t0 = time.perf_counter()
        scores = search.score_many([c for _, _, c in jobs])  # one batch: parallel backends use every worker
        log.info("%s: sensitivity scan done in %.1f s", self.name, time.perf_counter() - t0)
        self.sensitivity = {name: [] for name, _ in self.scan_units}
        for (name, level, _), acc in zip(jobs, scores):
            self.sensitivity[name].append((level, acc))

    def _sensitivity_densities(self, state: State, base_acc: float, tol: float) -> np.ndarray:
        """Per layer, the sparsest scanned level of its unit whose accuracy stays within ``tol`` of the base."""
        d = state.counts / state.numels
        out = d.copy()
        for name, idx in self.scan_units:
            ok = [lvl for lvl, acc in self.sensitivity.get(name, []) if acc >= base_acc - tol]
            if ok:
                for i in idx:
                    out[i] = min(d[i], 1.0 - max(ok))
        return out

    def _seed_counts(self, space: KeepSpace, state: State, keeps: list[int]) -> list[np.ndarray]:
        return [c for _, c in self._named_seed_counts(space, state, keeps)]

    def _named_seed_counts(self, space: KeepSpace, state: State, keeps: list[int]) -> list[tuple[str, np.ndarray]]:
        """The allocations the population starts from, each with its source, distinct."""
        seeds = []
        weights = state.weights()
        for keep in keeps:
            if self.options.seed_baselines:
                for name, rule in allocation.rules().items():  # the round's ranks: LAMP needs no sort of its own
                    seeds.append((name, space.fit(rule(weights, 1.0 - keep / state.total, self._ranks[1]), keep)))
            seeds.append(("previous", space.fit(state.counts, keep)))  # previous round's shape, scaled
            if self.sensitivity:
                base = self.reference if self.reference is not None else 1.0
                for tol in (0.01, 0.03, 0.1):
                    seeds.append((f"scan{tol:g}", space.fit(self._sensitivity_densities(state, base, tol), keep,
                                                           is_density=True)))
        uniq: dict[tuple, tuple[str, np.ndarray]] = {}
        for name, s in seeds:
            uniq.setdefault(tuple(int(v) for v in s), (name, s))
        return list(uniq.values())

    # ---------------------------------------------------------------------- the search
    def _search(self, state: State, round_index: int, make_seeds: Callable[[Allocator, KeepSpace], list],
                run: Callable[[Allocator, DifferentialEvolution, KeepSpace], np.ndarray],
                ) -> tuple[np.ndarray, float, dict[str, Any]]:
        """One round's search on the backend: a fresh solver (after the first round's scan) or the one
        saved mid-round when resuming; ``run`` drives it. Returns (counts, their score, DE record)."""
        self._ranks = None  # the previous round's ranks go before this round's are built
        with backend_round(self.backend) as scorer:
            self._ranks = (round_index, scorer.rank)  # the round's weights, sorted once, shared by seeds and masks
            space = magnitude_space(scorer, state, self.options, self.groups)
            saved = self.checkpointer.resumed(round_index) if self.checkpointer is not None else None
            if saved is not None:
                self.sensitivity = saved["sensitivity"]

            def seeds(search: Allocator) -> list:
                if self.scan_units and not self.sensitivity:  # the first round's sensitivity scan, then its seeds
                    self._scan(search, space, state)
                return make_seeds(search, space)
            search, solver = start_search(self.backend, self.options, self.rng, space, seeds, self.evals_per_round,
                                          saved=saved, progress=self.ctx.progress, deadline=self.deadline,
                                          on_generation=self._saver(round_index))
            self._search_rng = self.rng.bit_generator.state  # as it stands once the solver exists
            best = run(search, solver, space)
            score = search.rescored.get(tuple(int(c) for c in best))
            if score is not None and self.selection != "search":  # reported: all of val_data, before any
                score = _restoring(scorer, scorer.score_full)(best)     # fine-tune, as "search" reports it
            score = search.score(best) if score is None else score  # the full-data score when re-scored
        self.nfev += search.nfev
        return best, score, search.info(solver)

    def _saver(self, round_index: int):
        def save(search: Allocator, solver: DifferentialEvolution) -> None:
            if self.checkpointer is not None:
                self.checkpointer.save(search_state(search, solver, self._search_rng, sensitivity=self.sensitivity))
        return save

    def allocate(self, state: State, keep: int, round_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Budget form: maximise validation accuracy over allocations with exactly ``keep`` weights."""
        o, chosen = self.options, {}

        def run(search: Allocator, solver: DifferentialEvolution, space: KeepSpace) -> np.ndarray:
            seeds = self._named_seed_counts(space, state, [keep]) if self.selection != "search" else []
            best = search.maximise(solver, space, keep, f"DE round {round_index}", self._rescorer(), o.rescore_top,
                                   include=[c for _, c in seeds])
            retrained: dict[tuple[int, ...], float] = {}
            ahead: dict[tuple[int, ...], float] = {}
            if self.selection == "finetune":
                best, retrained, chosen["selection_cost"], ahead = self._finetune_finalists(
                    search, [c for _, c in seeds], self._lookahead(state, keep, round_index))
            chosen["selection"] = self._selection_record(search, seeds, best, retrained, ahead)
            return best

        best, acc, de = self._search(state, round_index,
                                     lambda search, space: self._seed_counts(space, state, [keep]), run)
        if chosen.get("selection"):
            de["selection"] = chosen["selection"]
        if chosen.get("selection_cost"):
            de.update(chosen["selection_cost"])
        return best, {"de": de, "val_accuracy_before_finetune": acc}

    @staticmethod
    def _selection_record(search: Allocator, seeds: list[tuple[str, np.ndarray]], best: np.ndarray,
                          retrained: dict[tuple[int, ...], float], ahead: Optional[dict] = None) -> list[dict]:
        """Every finalist's source and selection score (history[i]["de"]["selection"]), its score after the
        short fine-tune where it had one (and one round further, with ``selection_lookahead``), the chosen one
        marked."""
        names = {tuple(int(v) for v in c): n for n, c in seeds}
        won, ahead = tuple(int(v) for v in best), ahead or {}
        return [{"source": names.get(k, "search"), "score": v, "chosen": k == won,
                 **({"score_after_short_finetune": retrained[k]} if k in retrained else {}),
                 **({"score_one_round_ahead": ahead[k]} if k in ahead else {})}
                for k, v in search.rescored.items()]

    def _lookahead(self, state: State, keep: int, round_index: int) -> Optional[Callable[[np.ndarray], float]]:
        """``selection_lookahead``: a finalist's retrained weights scored at the next round's keep
        (:func:`next_round_score`); None in the last round or when the option is off."""
        o, ctx, scorer = self.options, self.ctx, self.backend.scorer
        final = int(round(state.total * (1.0 - ctx.sparsity)))
        keep_next = next_keep(keep, final, o.budget_rounds() - round_index - 1) if o.selection_lookahead else None
        if keep_next is None:
            return None
        score = scorer.holdout_now if self.search_batches is not None else ctx.score
        min_keep = state.min_keep(o.max_layer_sparsity)
        return lambda counts: next_round_score(ctx.model, ctx.targets, counts, keep_next, min_keep, score,
                                               scorer.calib)

    def _rescorer(self) -> Optional[Callable[[np.ndarray], float]]:
        """The selection score of a finalist, computed here on the round's scorer: on the held-out validation
        images (``selection`` 'holdout' / 'finetune') or on all of them ('search', or when none are held out)."""
        scorer = self.backend.scorer
        if self.search_batches is None:
            return _restoring(scorer, scorer.score_full) if self.selection == "finetune" else None
        return _restoring(scorer, scorer.score_holdout if self.selection != "search" else scorer.score_full)

    def _finetune_finalists(self, search: Allocator, seeds: list[np.ndarray],
                            ahead: Optional[Callable[[np.ndarray], float]] = None,
                            ) -> tuple[np.ndarray, dict[tuple[int, ...], float], dict, dict]:
        """``selection='finetune'``: the ``finalists`` best by the held-out score, and the ``finalist_seeds`` best
        seeds not among them (so the choice cannot fall below the best seed on the same measure), each with its
        magnitude masks
        on the round's weights held through ``finalist_epochs`` of the user's ``finetune`` (the same seed for
        every finalist), then scored on the held-out images again; the best wins (ties: the held-out order), or,
        when the retraining raised no finalist's score (``selection_fallback``), the best before it.
        ``ahead`` (``selection_lookahead``): each finalist also scored one round further, and that score added to
        the one it is chosen by."""
        ctx, o, scorer = self.ctx, self.options, self.backend.scorer
        scorer.restore()

        def retrain(counts: np.ndarray) -> None:
            finetune_round(ctx.model, ctx.targets, counts, capped(ctx.finetune, o.finalist_steps), o.finalist_epochs,
                           torch_seed=ctx.seed * 1000 + 1, ranks=self.magnitude_ranks(self._ranks[0]))

        measure = RetrainedMeasure(ctx.model, retrain, scorer.holdout_now if self.search_batches is not None
                                   else ctx.score, o.finalist_epochs, o.finalist_steps, ahead,
                                   calib=scorer.calib if o.finalist_adaptive_bn else None)
        ranked = sorted(search.rescored, key=lambda k: -search.rescored[k])  # stable: ties keep the order
        top = ranked[:o.finalists]
        keys = {tuple(int(v) for v in c) for c in seeds}
        for k in [k for k in ranked if k in keys][:o.finalist_seeds]:  # the best seeds, by the held-out score
            if k not in top:
                top.append(k)
        scores = {k: measure(np.array(k, dtype=np.int64)) for k in top}
        before = {k: search.rescored[k] for k in scores}
        fell_back = o.selection_fallback and uninformative(scores, before)
        if measure.ahead:
            by = before if fell_back else scores
            won = choose({k: by[k] + measure.ahead[k] for k in scores}, keys, o.selection_margin)
        else:
            won = choose(scores, keys, o.selection_margin, before=before if fell_back else None)
        log.info("%s: finalists after a short fine-tune: %s", self.name, ", ".join(f"{v:.4f}" for v in scores.values()))
        return (np.array(won, dtype=np.int64), scores, {**measure.cost(), "selection_fallback_used": fell_back},
                measure.ahead)

    def propose(self, state: State, round_index: int, caution: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Accuracy form: minimise kept weights s.t. accuracy >= reference - search_drop (Deb's rules)."""
        o = self.options
        drop = o.search_drop * (0.5 ** caution)
        limit = self.reference - drop

        def make_seeds(search: Allocator, space: KeepSpace) -> list[np.ndarray]:
            cur = int(state.counts.sum())
            keeps = [max(int(space.min_keep.sum()), int(round(cur * o.step_density ** j))) for j in (1, 2, 3)]
            seeds = [space.max_keep.copy()] + self._seed_counts(space, state, keeps)
            if self.sensitivity:
                seeds.append(np.clip(np.round(self._sensitivity_densities(state, self.reference, drop)
                                              * state.numels).astype(np.int64), space.min_keep, space.max_keep))
            return seeds

        def run(search: Allocator, solver: DifferentialEvolution, space: KeepSpace) -> np.ndarray:
            penalty = o.penalty_weight if o.fitness == "penalty" else None
            best = search.minimise(solver, space, limit, penalty=penalty, desc=f"DE round {round_index}")
            self._infeasible = o.fitness == "feasibility" and solver.violation[solver.best_index()] > 0
            return best

        best, acc, de = self._search(state, round_index, make_seeds, run)
        if self._infeasible:
            best = state.counts.copy()
        return best, {"de": de, "val_accuracy_before_finetune": acc, "search_drop": drop}


def _restoring(scorer: MagnitudeScorer, measure: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], float]:
    """``measure`` of a candidate with the round's weights put back after it (the search's scorer is shared)."""
    def score(counts: np.ndarray) -> float:
        try:
            return measure(counts)
        finally:
            scorer.restore()
    return score


@hookimpl
def register_pruners():
    return [DELayerwise]
