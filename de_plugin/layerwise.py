"""``de_layerwise``: differential evolution over per-layer pruning thresholds (Wu et al. 2021).

Each round, DE searches one value per prunable layer jointly; magnitude pruning is applied
inside each layer; the loop in :mod:`de_plugin.iterative` then fine-tunes (with optional
recovery) and moves to the next round. Why it beats one-shot allocation (ALGORITHMS.md §4):
searching in small steps, each round re-allocating over the fine-tuned weights, with the
population seeded by the baselines' allocations so DE can only improve on them.

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
import math
import time
from typing import Any, Optional

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from . import allocation
from .de import DifferentialEvolution
from .evaluation import BackendOptions, Bound, Scorer, make_backend
from .hookspecs import hookimpl
from .iterative import IterativeOptions, IterativePruner, State
from .pruner import Context

log = logging.getLogger("de_plugin")


class LayerwiseOptions(IterativeOptions, BackendOptions):
    # chosen by the recovery ablation on validation accuracy (BENCHMARKS.md): splicing > none > random
    recovery: str = Field("splicing", pattern="^(none|random|splicing)$")
    population: int = Field(20, ge=4, description="DE population size")
    generations: int = Field(20, ge=0, description="DE generations per round")
    max_evals: Optional[int] = Field(None, ge=1, description="total fitness evaluations over all rounds")
    time_limit: Optional[float] = Field(None, gt=0, description="seconds for all searches; DE stops early")
    parametrization: str = Field("ratio", pattern="^(ratio|std)$")
    max_std: float = Field(4.0, gt=0, description="std parametrisation: upper bound of x_l")
    fitness: str = Field("feasibility", pattern="^(feasibility|penalty)$")
    penalty_weight: float = Field(0.5, ge=0.0, le=1.0, description="a in a*(1-acc)+(1-a)*density")
    search_drop: float = Field(0.03, gt=0.0, lt=1.0, description="accuracy form: allowed drop before fine-tuning")
    strategy: str = Field("rand1bin", pattern="^(rand1bin|best1bin|currenttobest1bin)$")
    mutation: float = Field(0.5, ge=0.0, le=2.0)
    recombination: float = Field(0.9, ge=0.0, le=1.0)
    bound_handling: str = Field("clip", pattern="^(clip|reflect|random)$")
    seed_baselines: bool = Field(True, description="seed the population with uniform/global/LAMP/ERK allocations")
    sensitivity_scan: bool = Field(True, description="per-layer sensitivity scan in the first round (warm start)")
    scan_levels: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    perturb: float = Field(0.05, ge=0.0, le=1.0, description="noise (share of range) for perturbed seeds")
    device: Optional[str] = Field(None, description="move the working copy here (e.g. 'cuda')")
    early_reject: bool = Field(
        True, description="stop scoring a trial once its accuracy on part of val_data shows it cannot beat its parent "
                          "(same masks; needs several val_data batches and metric='accuracy')")
    checkpoint: Optional[str] = Field(None, description="file the whole search state is saved to after every generation")
    resume: bool = Field(False, description="continue from `checkpoint` (a run killed at any point ends identically)")


def seed_population(seeds: list[np.ndarray], bounds, population: int, perturb: float,
                    rng: np.random.Generator) -> np.ndarray | None:
    """Initial DE members: the seed vectors, then noisy copies of them (``perturb`` x range) up to
    twice their number; DE's own sampling fills the rest of the population."""
    x0 = list(seeds)[:population]
    lo, hi = np.array(bounds, dtype=float).T
    while len(x0) < min(population, 2 * max(1, len(seeds))) and seeds:
        base = x0[int(rng.integers(len(seeds)))]
        x0.append(np.clip(base + rng.normal(0, perturb, len(base)) * (hi - lo), lo, hi))
    return np.array(x0) if x0 else None


class LayerSearch:
    """Fitness of keep-count vectors for one round, through the pruner's evaluation backend.

    The backend takes the round's weights once (snapshot, magnitude order; workers get a copy),
    then scores batches of count vectors; identical candidates are cached here.
    """

    def __init__(self, pruner: "DELayerwise", ctx: Context, state: State):
        self.pruner, self.ctx, self.state = pruner, ctx, state
        self.backend = pruner.backend
        self.backend.start_round()  # the scorer snapshots the round's weights and magnitude order once
        scorer = self.backend.scorer
        self.w0, self.order = scorer.w0, scorer.order
        self.sorted_mag = [w.abs().reshape(-1)[o].cpu().numpy() for w, o in zip(self.w0, self.order)]
        active = [w[w != 0] for w in self.w0]
        self.std = np.array([float(a.std()) if a.numel() > 1 else 1.0 for a in active])
        self.std[self.std <= 0] = 1.0
        self.cache: dict[tuple[int, ...], float] = {}
        self.rejected = self.skipped = self.images_saved = 0

    def restore(self) -> None:
        self.backend.end_round()

    def score_many(self, batch: list[np.ndarray], floors: Optional[list[Optional[float]]] = None) -> list[float]:
        """Scores in order; identical candidates are scored once and exact scores cached.

        ``floors[i]``: the score candidate i must reach to matter (None: score exactly; inf: it
        cannot matter, so it is not scored and gets ``Bound(-inf)``). Below its floor a candidate
        may come back as a :class:`Bound`, which is never cached.
        """
        keys = [tuple(int(c) for c in counts) for counts in batch]
        floors = floors if floors is not None else [None] * len(batch)
        need: dict[tuple[int, ...], Optional[float]] = {}
        for k, fl in zip(keys, floors):
            if k in self.cache:
                continue
            if k in need:  # the least demanding floor serves every copy
                need[k] = None if need[k] is None or fl is None else min(need[k], fl)
            else:
                need[k] = fl
        todo = [k for k, fl in need.items() if fl is None or fl != math.inf]
        got: dict[tuple[int, ...], float] = {}
        if todo:
            values = self.backend.evaluate([np.array(k) for k in todo], [need[k] for k in todo])
            for k, v in zip(todo, values):
                if isinstance(v, Bound):
                    got[k] = v
                    self.rejected += 1
                    self.images_saved += v.images_left
                else:
                    self.cache[k] = v
            self.pruner.nfev += len(todo)
        self.skipped += len(need) - len(todo)
        return [self.cache[k] if k in self.cache else got.get(k, Bound(-math.inf)) for k in keys]

    def score(self, counts: np.ndarray) -> float:
        return self.score_many([counts])[0]

    # x <-> counts ---------------------------------------------------------------------------
    def counts_from_x(self, x: np.ndarray) -> np.ndarray:
        n = self.state.numels
        if self.pruner.options.parametrization == "ratio":
            k = n - np.round(np.asarray(x) * n).astype(np.int64)
        else:
            k = np.array([int(np.sum(s > xi * sd)) for s, xi, sd in zip(self.sorted_mag, x, self.std)])
        return np.clip(k, self.min_keep, self.max_keep)

    def x_from_counts(self, counts: np.ndarray) -> np.ndarray:
        n = self.state.numels
        if self.pruner.options.parametrization == "ratio":
            return 1.0 - counts / n
        x = []
        for s, k, sd in zip(self.sorted_mag, counts, self.std):
            k = int(k)
            hi = s[k - 1] if k > 0 else s[0] * 1.01 + 1e-12
            lo = s[k] if k < len(s) else 0.0
            x.append(0.5 * (hi + lo) / sd)
        return np.asarray(x)

    @property
    def min_keep(self) -> np.ndarray:
        return self.state.min_keep(self.pruner.options.max_layer_sparsity)

    @property
    def max_keep(self) -> np.ndarray:
        return np.maximum(self.state.max_keep(self.pruner.options.min_layer_sparsity), self.min_keep)

    def bounds(self) -> list[tuple[float, float]]:
        o = self.pruner.options
        if o.parametrization == "ratio":
            cur = 1.0 - self.max_keep / self.state.numels
            return [(min(c, o.max_layer_sparsity), o.max_layer_sparsity) for c in cur]
        return [(0.0, o.max_std)] * len(self.w0)

    def fit(self, counts_or_density: np.ndarray, keep: int, is_density: bool = False) -> np.ndarray:
        d = counts_or_density if is_density else counts_or_density / self.state.numels
        return allocation.fit_budget(d, self.state.numels, keep, self.min_keep, upper=self.max_keep)


class DELayerwise(IterativePruner):
    """Differential-evolution layer-wise magnitude pruning (``de_layerwise``)."""

    name = "de_layerwise"
    Options = LayerwiseOptions
    needs_evaluate = True

    def begin(self, ctx: Context, reference: Optional[float]) -> None:
        o = self.options
        if o.device:
            ctx.model.to(o.device)
        self.reference = reference
        self.sensitivity: dict[str, list[tuple[float, float]]] = {}
        self.deadline = None if o.time_limit is None else time.perf_counter() + o.time_limit
        budget_rounds = o.rounds if ctx.sparsity is not None else o.rounds + o.patience
        scan_cost = len(ctx.targets) * len(o.scan_levels) if o.sensitivity_scan else 0
        self.evals_per_round = None if o.max_evals is None else max(o.population, (o.max_evals - scan_cost) // budget_rounds)
        self.rng = np.random.default_rng(ctx.seed)
        scorer = Scorer(ctx.model, ctx.targets, ctx.evaluate, *((ctx.val_batches, ctx.metric) if o.early_reject else ()))
        self.backend = make_backend(o.backend, scorer, o.workers, o.threads_per_worker, o.ray_address,
                                    ctx.val_batches, ctx.metric)

    # ---------------------------------------------------------------------- warm starts
    def _scan(self, search: LayerSearch) -> None:
        """Per-layer sensitivity: accuracy with only that layer pruned to each scan level."""
        base = search.state.counts.copy()
        jobs = []
        for i, t in enumerate(self.ctx.targets):
            for level in self.options.scan_levels:
                k = int(round(t.numel * (1.0 - min(level, self.options.max_layer_sparsity))))
                if k >= base[i]:
                    continue
                counts = base.copy()
                counts[i] = max(k, int(search.min_keep[i]))
                jobs.append((t.name, float(level), counts))
        scores = search.score_many([c for _, _, c in jobs])  # one batch: parallel backends use every worker
        self.sensitivity = {t.name: [] for t in self.ctx.targets}
        for (name, level, _), acc in zip(jobs, scores):
            self.sensitivity[name].append((level, acc))

    def _sensitivity_densities(self, search: LayerSearch, base_acc: float, tol: float) -> np.ndarray:
        """Per layer, the sparsest scanned level whose accuracy stays within ``tol`` of the base."""
        d = search.state.counts / search.state.numels
        out = d.copy()
        for i, t in enumerate(self.ctx.targets):
            ok = [lvl for lvl, acc in self.sensitivity.get(t.name, []) if acc >= base_acc - tol]
            if ok:
                out[i] = min(d[i], 1.0 - max(ok))
        return out

    def _seed_counts(self, search: LayerSearch, keeps: list[int]) -> list[np.ndarray]:
        state, seeds = search.state, []
        weights = state.weights()
        for keep in keeps:
            if self.options.seed_baselines:
                for rule in allocation.ALLOCATIONS.values():
                    seeds.append(search.fit(rule(weights, 1.0 - keep / state.total), keep))
            seeds.append(search.fit(state.counts, keep))  # previous round's shape, scaled
            if self.sensitivity:
                base = self.reference if self.reference is not None else 1.0
                for tol in (0.01, 0.03, 0.1):
                    seeds.append(search.fit(self._sensitivity_densities(search, base, tol), keep, is_density=True))
        uniq: dict[tuple, np.ndarray] = {}
        for s in seeds:
            uniq.setdefault(tuple(int(v) for v in s), s)
        return list(uniq.values())

    # ---------------------------------------------------------------------- the search
    def _solver(self, search: LayerSearch, seeds: list[np.ndarray], round_index: int) -> DifferentialEvolution:
        o = self.options
        bounds = search.bounds()
        x0 = seed_population([search.x_from_counts(s) for s in seeds], bounds, o.population, o.perturb, self.rng)
        return DifferentialEvolution(
            bounds, popsize=o.population, strategy=o.strategy, mutation=o.mutation,
            recombination=o.recombination, maxiter=o.generations, maxfun=self.evals_per_round,
            bound_handling=o.bound_handling, x0=x0,
            seed=int(self.rng.integers(2**31)),
        )

    def checkpoint_state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "sensitivity": self.sensitivity}

    def restore_checkpoint_state(self, data: dict[str, Any]) -> None:
        self.rng.bit_generator.state = data["rng"]
        self.sensitivity = data["sensitivity"]

    def _start_search(self, search: LayerSearch, round_index: int, make_seeds) -> DifferentialEvolution:
        """A fresh solver (after the first round's scan), or the one saved mid-round when resuming."""
        saved = self.take_resumed_search(round_index)
        if saved is not None:
            search.cache = dict(saved["cache"])
            search.rejected, search.skipped, search.images_saved = saved.get("counters", (0, 0, 0))
            self.sensitivity = saved["sensitivity"]
            self.rng.bit_generator.state = saved["rng"]
            self.nfev = saved["nfev"]
            solver = DifferentialEvolution.from_state(saved["solver"])
        else:
            if self.options.sensitivity_scan and not self.sensitivity:
                self._scan(search)
            solver = self._solver(search, make_seeds(), round_index)
        self._search_rng = self.rng.bit_generator.state  # as it stands once the solver exists
        self._search = search
        return solver

    def _run_de(self, solver: DifferentialEvolution, evaluate_batch, desc: str) -> None:
        pbar = tqdm(total=solver.maxiter + 1, desc=desc, leave=False, disable=not self.ctx.progress)
        while not solver.done:
            if self.deadline is not None and solver.history and time.perf_counter() > self.deadline:
                log.info("time_limit reached: stopping the search at generation %d", solver.nit)
                break
            xs = solver.ask()
            f, v, x_eff = evaluate_batch(xs, solver.parents() if self.options.early_reject else None)
            solver.tell(f, v, x_eff)
            s = self._search
            self.save_search({"solver": solver.state_dict(), "cache": dict(s.cache), "nfev": self.nfev,
                              "counters": (s.rejected, s.skipped, s.images_saved),
                              "rng": self._search_rng, "sensitivity": self.sensitivity})
            pbar.update(1)
            pbar.set_postfix(best=f"{solver.fun[solver.best_index()]:.4f}")
        pbar.close()

    def _round_info(self, solver: DifferentialEvolution, search: LayerSearch, extra: dict[str, Any]) -> dict[str, Any]:
        r = solver.result()
        return {"de": {"nfev": r.nfev, "nit": r.nit, "best_fun": r.fun, "best_violation": r.violation,
                       "message": r.message, "history": [h["best_fun"] for h in r.history],
                       "early_rejected": search.rejected, "skipped": search.skipped,
                       "images_saved": search.images_saved}, **extra}

    def allocate(self, state: State, keep: int, round_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Budget form: maximise validation accuracy over allocations with exactly ``keep`` weights."""
        search = LayerSearch(self, self.ctx, state)
        try:
            solver = self._start_search(search, round_index, lambda: self._seed_counts(search, [keep]))

            def evaluate_batch(xs, parents):
                counts = [search.fit(search.counts_from_x(x), keep) for x in xs]
                # a trial replaces its parent when -acc <= parent's objective: it needs acc >= -f_parent
                floors = None if parents is None else [-float(fp) for fp in parents[0][:len(counts)]]
                f = [-a for a in search.score_many(counts, floors)]
                return f, None, np.array([search.x_from_counts(c) for c in counts])

            self._run_de(solver, evaluate_batch, f"DE round {round_index}")
            best = search.fit(search.counts_from_x(solver.population[solver.best_index()]), keep)
            acc = search.score(best)
        finally:
            search.restore()
        return best, self._round_info(solver, search, {"val_accuracy_before_finetune": acc})

    def propose(self, state: State, round_index: int, caution: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Accuracy form: minimise kept weights s.t. accuracy >= reference - search_drop (Deb's rules)."""
        o = self.options
        drop = o.search_drop * (0.5 ** caution)
        limit = self.reference - drop
        search = LayerSearch(self, self.ctx, state)
        try:
            def make_seeds():
                cur = int(state.counts.sum())
                keeps = [max(int(search.min_keep.sum()), int(round(cur * o.step_density ** j))) for j in (1, 2, 3)]
                seeds = [search.max_keep.copy()] + self._seed_counts(search, keeps)
                if self.sensitivity:
                    seeds.append(np.clip(np.round(self._sensitivity_densities(search, self.reference, drop)
                                                  * state.numels).astype(np.int64), search.min_keep, search.max_keep))
                return seeds

            solver = self._start_search(search, round_index, make_seeds)
            total = state.total

            def evaluate_batch(xs, parents):
                f, v = [], []
                counts = [search.counts_from_x(x) for x in xs]
                floors = None
                if parents is not None:
                    floors = [self._floor(float(c.sum()) / total, fp, vp, limit)
                              for c, fp, vp in zip(counts, *parents)]
                for c, acc in zip(counts, search.score_many(counts, floors)):
                    dens = float(c.sum()) / total
                    if o.fitness == "penalty":
                        f.append(o.penalty_weight * (1.0 - acc) + (1.0 - o.penalty_weight) * dens)
                        v.append(0.0)
                    else:
                        f.append(dens)
                        v.append(max(0.0, limit - acc))
                return f, v, np.array([search.x_from_counts(c) for c in counts])

            self._run_de(solver, evaluate_batch, f"DE round {round_index}")
            b = solver.best_index()
            best = search.counts_from_x(solver.population[b])
            acc = search.score(best)
            if o.fitness == "feasibility" and solver.violation[b] > 0:
                best = state.counts.copy()
        finally:
            search.restore()
        return best, self._round_info(solver, search, {"val_accuracy_before_finetune": acc, "search_drop": drop})

    def _floor(self, density: float, f_parent: float, v_parent: float, limit: float) -> Optional[float]:
        """Accuracy form: the accuracy a trial of this density needs to replace its parent under
        the solver's selection (``de.better``); inf when no accuracy would do, None when any would."""
        o = self.options
        if o.fitness == "penalty":  # a (1 - acc) + (1 - a) density <= f_parent
            a = o.penalty_weight
            if a == 0.0:
                return None if density <= f_parent else math.inf
            return 1.0 - (f_parent - (1.0 - a) * density) / a
        if v_parent <= 0.0:  # feasible parent: the trial must be feasible and no denser
            return limit if density <= f_parent else math.inf
        return limit - v_parent  # infeasible parent: the trial's violation must be no larger

    def run(self, ctx: Context):
        self.ctx = ctx
        self.backend = None
        try:
            result = super().run(ctx)
        except KeyboardInterrupt:
            if self.options.checkpoint:
                log.warning("interrupted: the search state is in %s; run again with resume=True to continue",
                            self.options.checkpoint)
            raise
        finally:
            if self.backend is not None:
                self.backend.close()
        if self.sensitivity and result.history:
            result.history[0]["sensitivity_scan"] = self.sensitivity
        return result


@hookimpl
def register_pruners():
    return [DELayerwise]
