"""The allocator: differential evolution over per-layer keep-counts, scored by any scorer.

One search for every caller: ``de_layerwise``'s rounds (magnitude masks, :class:`MagnitudeScorer`),
the NNI pruner's scheduled re-allocations (through the round runner) and INC's pattern-aware search
(INC's own pattern masks, the core's :class:`de_plugin.weights.patterns.PatternScorer`, which INC's adapter uses). What differs between them is injected:

* the **scorer** behind a backend (:mod:`de_plugin.evaluation`) turns keep-counts into a score;
* the **space** (:class:`KeepSpace`) maps DE vectors to keep-counts and back, and projects a
  vector onto an exact budget;
* the **seeds** (allocations the population starts from) and the solver settings.

The allocator owns what is common: the solver (``de.DifferentialEvolution``, ask / tell), the
cache of exact scores, exact early rejection (each trial gets the score it must reach to beat its
parent; a :class:`~de_plugin.evaluation.Bound` is never cached), the time limit, progress, the
per-generation hook checkpoints hang on, and the two fitness forms (:meth:`Allocator.maximise`
under a budget, :meth:`Allocator.minimise` under an accuracy limit).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
from pydantic import Field

from .budget import fit_budget
from .de import DifferentialEvolution
from .selection import choose, uninformative
from ..progress import progress_bar
from ..evaluation import Backend, BackendOptions, Bound

log = logging.getLogger("de_plugin")


class SearchOptions(BackendOptions):
    """The DE search's settings (shared by ``de_layerwise``, its NNI pruner and INC's ``de_options``)."""

    population: Optional[int] = Field(
        None, ge=4, description="DE population size; None: max(20, dimension / 2), at most 64 (20 up to 40 layers)")
    generations: int = Field(20, ge=0, description="DE generations per round")
    max_evals: Optional[int] = Field(None, ge=1, description="total fitness evaluations over all rounds")
    strategy: str = Field("rand1bin", pattern="^(rand1bin|best1bin|currenttobest1bin)$",
                          description="DE's mutation strategy")
    search_strategy: str = Field(
        "de", pattern="^(de|random|evopress)$",
        description="budget form: how the allocation is searched, at the same number of evaluations: 'de' "
                    "(differential evolution), 'random' (the seeds, then uniform random allocations: the control), "
                    "'evopress' ((1 + lambda) from the best seed, level-switch mutations that move sparsity between "
                    "two layers; EvoPress, Sieberling et al. 2024). The accuracy form always searches with DE")
    adaptation: str = Field("none", pattern="^(none|jde)$",
                            description="'jde': self-adaptive F and CR per member (Brest et al. 2006)")
    # chosen by benchmarks/deep.py --ablation (ResNet-20): at depth DE rarely improves on its seeds within a
    # round, and a generation costs population x (BN re-estimation + a forward); LeNets keep all generations
    stall: Optional[int] = Field(
        None, ge=0, description="stop a round's search once its best has not improved for this many generations "
                                "(0: run all generations); None: 3 above 16 searched values, else 0")
    mutation: float = Field(0.5, ge=0.0, le=2.0)
    recombination: float = Field(0.9, ge=0.0, le=1.0)
    bound_handling: str = Field("clip", pattern="^(clip|reflect|random)$")
    seed_baselines: bool = Field(True, description="seed the population with uniform/global/LAMP/ERK allocations")
    perturb: float = Field(0.05, ge=0.0, le=1.0, description="noise (share of range) for perturbed seeds")
    early_reject: bool = Field(
        True, description="stop scoring a trial once its accuracy on part of val_data shows it cannot beat its parent "
                          "(same masks; needs several val_data batches and metric='accuracy')")


def population_for(population: Optional[int], dim: int, strategy: str = "de") -> int:
    """The population for a ``dim``-dimensional search: the given one, checked against the minimum, or the
    default sized with the dimension. DE's minimum is ``max(4, ceil(dim / 10))`` (its mutations combine
    members); for ``evopress`` (offspring of the best so far) and ``random`` the population is only how many
    candidates a generation scores, so 4 at any dimension (a 32-layer decoder has 224 Linear layers)."""
    least = max(4, math.ceil(dim / 10)) if strategy == "de" else 4
    if population is None:
        return int(min(64, max(20, math.ceil(dim / 2))))
    if population < least:
        raise ValueError(f"population={population} is too small for a {dim}-dimensional search: give at least "
                         f"{least} (dimension / 10), leave it unset (auto: {population_for(None, dim)}), or "
                         "search fewer values with groups='stage' / 'block' / 'type'")
    return int(population)


def stall_for(stall: Optional[int], dim: int) -> int:
    """The given ``stall``, or the default for a ``dim``-dimensional search: 3 above 16 values (deep
    models, where each generation is costly and rarely improves), else 0 (every generation runs)."""
    if stall is not None:
        return int(stall)
    return 3 if dim > 16 else 0


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


def _key(counts: np.ndarray) -> tuple[int, ...]:
    """A keep-count vector as the cache's key."""
    return tuple(int(c) for c in counts)


class KeepSpace:
    """Per-layer keep-counts within ``[min_keep, max_keep]`` and the DE vectors that stand for them.

    This base is the ``ratio`` parametrisation: ``x_l`` is layer l's sparsity, rounded to a count.
    ``repairs``: :meth:`to_x` inverts :meth:`to_counts`, so the population may hold the projected
    (repaired) vectors; spaces whose way back is approximate keep the asked ones.
    """

    repairs = True

    def __init__(self, numels: np.ndarray, min_keep: np.ndarray, max_keep: np.ndarray,
                 bounds: Sequence[tuple[float, float]]):
        self.numels = np.asarray(numels, dtype=np.int64)
        self.min_keep, self.max_keep = np.asarray(min_keep), np.asarray(max_keep)
        self.bounds = [tuple(b) for b in bounds]

    def to_counts(self, x: np.ndarray) -> np.ndarray:
        n = self.numels
        return np.clip(n - np.round(np.asarray(x) * n).astype(np.int64), self.min_keep, self.max_keep)

    def to_x(self, counts: np.ndarray) -> np.ndarray:
        return 1.0 - counts / self.numels

    def fit(self, counts_or_density: np.ndarray, budget: int, is_density: bool = False) -> np.ndarray:
        """The allocation's shape (per-layer densities) scaled by one factor to keep exactly ``budget`` weights."""
        d = counts_or_density if is_density else counts_or_density / self.numels
        return fit_budget(d, self.numels, budget, self.min_keep, upper=self.max_keep)

    def project(self, x: np.ndarray, budget: int) -> np.ndarray:
        """The keep-counts a DE vector stands for, keeping exactly ``budget`` weights."""
        return self.fit(self.to_counts(x), budget)


class DensitySpace(KeepSpace):
    """``x_l`` is layer l's sparsity, projected onto the budget as a real density (no rounding
    first): INC's pattern-aware search, whose masks round to the pattern's blocks anyway."""

    def project(self, x: np.ndarray, budget: int) -> np.ndarray:
        return self.fit(1.0 - np.asarray(x), budget, is_density=True)


class StdSpace(KeepSpace):
    """Han et al.'s quality parameter: layer l keeps ``|w| > x_l * std(W_l)`` (``sorted_mag``: each
    layer's magnitudes in descending order, ``std``: of its non-zero weights)."""

    def __init__(self, numels, min_keep, max_keep, bounds, sorted_mag: list[np.ndarray], std: np.ndarray):
        super().__init__(numels, min_keep, max_keep, bounds)
        self.sorted_mag, self.std = sorted_mag, std

    def to_counts(self, x: np.ndarray) -> np.ndarray:
        k = np.array([int(np.sum(s > xi * sd)) for s, xi, sd in zip(self.sorted_mag, x, self.std)])
        return np.clip(k, self.min_keep, self.max_keep)

    def to_x(self, counts: np.ndarray) -> np.ndarray:
        x = []
        for s, k, sd in zip(self.sorted_mag, counts, self.std):
            k = int(k)
            hi = s[k - 1] if k > 0 else s[0] * 1.01 + 1e-12
            lo = s[k] if k < len(s) else 0.0
            x.append(0.5 * (hi + lo) / sd)
        return np.asarray(x)


@dataclass(frozen=True)
class Screen:
    """EvoPress's multi-step selection for ``search_strategy='evopress'``: every generation's ``offspring``
    are first scored cheaply (``score(counts, generation)``, e.g. on one calibration batch, a different one
    each generation) and only the ``survivors`` best are scored in full. A cheap score ranks many
    mutations for the price of a few full ones, and the full score keeps the parent's choice exact.
    ``cost``: one screening in full evaluations (the budget counts both kinds)."""

    score: Callable[[np.ndarray, int], float]
    offspring: int
    survivors: int
    cost: float

    def __post_init__(self) -> None:
        if not 1 <= self.survivors <= self.offspring:
            raise ValueError(f"survivors={self.survivors} must be between 1 and the offspring screened per "
                             f"generation ({self.offspring}): lower survivors or raise population")


@dataclass(frozen=True)
class Guide:
    """What ``search_strategy='guided'`` needs besides the scorer: a local estimate of the score.

    ``estimate(parent)`` (keep-counts) returns ``change(layer, count)``, the predicted change of the score
    (higher is better) when that one layer of ``parent`` keeps ``count`` weights instead; a move's
    prediction is the sum over the layers it changes. ``cost``: one estimate in evaluations (the budget
    counts it). Why: a (1 + lambda) search that draws its level switches at random spends most of its
    evaluations on moves that lose; ranked by an estimate made at the parent (for a language model, a
    second-order Taylor expansion of the KL divergence in the removed and restored weights,
    :class:`de_plugin.lm.sensitivity.TaylorGuide`), the first moves scored are the likely winners, and
    the exact scores still decide."""

    estimate: Callable[[np.ndarray], Callable[[int, int], float]]
    cost: float


#: a guided move transfers this share of the smaller layer's range (``max_keep - min_keep``) per step, 1-3 steps
#: (EvoPress's level switch: 5% of the range a level, one to three levels)
GUIDED_STEP = 0.05


class Allocator:
    """One search (one round's weights) over keep-count vectors, scored through ``backend``.

    ``rng`` draws the solver's seed and the perturbed seeds (the caller's generator, so a run's
    rounds draw from one stream); ``deadline`` (``time.perf_counter()`` value) stops DE early;
    ``on_generation(allocator, solver)`` runs after every generation (checkpoints).
    """

    def __init__(self, backend: Backend, options: SearchOptions, rng: np.random.Generator, *,
                 progress: bool = False, deadline: Optional[float] = None,
                 on_generation: Optional[Callable[["Allocator", DifferentialEvolution], None]] = None):
        self.backend, self.options, self.rng = backend, options, rng
        self.progress, self.deadline, self.on_generation = progress, deadline, on_generation
        self.cache: dict[tuple[int, ...], float] = {}
        self.rescored: dict[tuple[int, ...], float] = {}  # multi-fidelity: full-data scores of the finalists
        self.nfev = self.rejected = self.skipped = self.images_saved = 0
        self.searched: Optional[int] = None  # candidates a non-DE search_strategy drew (its record)
        self.screened = 0  # candidates only screened (Screen), not scored in full
        self.fell_back = False  # _rescore chose by the search's scores (a retraining raised no finalist's score)

    # ------------------------------------------------------------------ scoring
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
            self.nfev += len(todo)
        self.skipped += len(need) - len(todo)
        return [self.cache[k] if k in self.cache else got.get(k, Bound(-math.inf)) for k in keys]

    def score(self, counts: np.ndarray) -> float:
        return self.score_many([counts])[0]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"cache": dict(self.cache), "nfev": self.nfev,
                "counters": (self.rejected, self.skipped, self.images_saved)}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        self.cache = dict(data["cache"])
        self.nfev = data["nfev"]
        self.rejected, self.skipped, self.images_saved = data.get("counters", (0, 0, 0))

    # ------------------------------------------------------------------ the solver
    def solver(self, space: KeepSpace, seeds: list[np.ndarray], maxfun: Optional[int]) -> DifferentialEvolution:
        """A fresh solver whose population starts from ``seeds`` (keep-count vectors)."""
        o = self.options
        pop = population_for(o.population, len(space.bounds), o.search_strategy)
        x0 = seed_population([space.to_x(s) for s in seeds], space.bounds, pop, o.perturb, self.rng)
        return DifferentialEvolution(
            space.bounds, popsize=pop, strategy=o.strategy, mutation=o.mutation,
            recombination=o.recombination, maxiter=o.generations, maxfun=maxfun,
            bound_handling=o.bound_handling, x0=x0, seed=int(self.rng.integers(2**31)), adaptation=o.adaptation,
            stall=stall_for(o.stall, len(space.bounds)),
        )

    def _run(self, solver: DifferentialEvolution, evaluate_batch, desc: str) -> None:
        pbar = progress_bar(total=solver.maxiter + 1, desc=desc, enabled=self.progress)
        while not solver.done:
            if self.deadline is not None and solver.history and time.perf_counter() > self.deadline:
                log.info("time_limit reached: stopping the search at generation %d", solver.nit)
                break
            xs = solver.ask()
            f, v, x_eff = evaluate_batch(xs, solver.parents() if self.options.early_reject else None)
            solver.tell(f, v, x_eff)
            if self.on_generation is not None:
                self.on_generation(self, solver)
            pbar.update(1)
            pbar.set_postfix(best=f"{solver.fun[solver.best_index()]:.4f}")
        pbar.close()

    def maximise(self, solver: DifferentialEvolution, space: KeepSpace, budget: int, desc: str = "DE",
                 rescore: Optional[Callable[[np.ndarray], float]] = None, top: int = 4,
                 include: Sequence[np.ndarray] = (), screen: Optional[Screen] = None,
                 fallback: bool = False, guide: Optional[Guide] = None) -> np.ndarray:
        """Budget form: the allocation within ``budget`` with the best score (the space's budget: kept
        weights for a :class:`KeepSpace`, a cost for de_channel's ``ChannelSpace``).

        ``rescore`` (multi-fidelity): the search scored on part of the data, or with less work than
        the final one; the ``top`` best distinct members of the last population, and every vector
        of ``include`` (the seeds, say), are re-scored with it and the best of those returned (their
        scores in :attr:`rescored`). ``screen``: EvoPress's multi-step selection (``search_strategy='evopress'``
        only); ``guide``: the estimate ``search_strategy='guided'`` ranks its moves by (required there).
        ``fallback``: ``rescore`` retrains before scoring, on the search's data; when it raised no
        finalist's score, choose by the search's scores instead (:func:`~de_plugin.search.selection.choose`)."""
        def evaluate_batch(xs, parents):
            counts = [space.project(x, budget) for x in xs]
            # a trial replaces its parent when -score <= parent's objective: it needs score >= -f_parent
            floors = None if parents is None else [-float(fp) for fp in parents[0][:len(counts)]]
            f = [-a for a in self.score_many(counts, floors)]
            return f, None, (np.array([space.to_x(c) for c in counts]) if space.repairs else None)

        if self.options.search_strategy != "de":
            ranked = self._other_search(solver, space, budget, desc, screen, guide)
        else:
            self._run(solver, evaluate_batch, desc)
            ranked = [space.project(solver.population[i], budget) for i in np.argsort(solver.fun, kind="stable")]
        if rescore is None:
            return ranked[0]
        return self._rescore(ranked, rescore, top, include, fallback)

    def _other_search(self, solver: DifferentialEvolution, space: KeepSpace, budget: int, desc: str,
                      screen: Optional[Screen] = None, guide: Optional[Guide] = None) -> list[np.ndarray]:
        """``search_strategy`` 'random', 'evopress' or 'guided' at DE's evaluation budget (its initial
        population, seeds included, then ``population`` candidates for each of ``generations``); candidates
        best first."""
        evals = solver.popsize * (solver.maxiter + 1) if solver.maxfun is None else solver.maxfun
        rng = np.random.default_rng(int(self.rng.integers(2**31)))
        lo, hi = (np.array([b[i] for b in space.bounds], dtype=float) for i in (0, 1))
        scored: dict[tuple[int, ...], tuple[float, np.ndarray]] = {}

        def score(cands: list[np.ndarray]) -> None:
            for c, v in zip(cands, self.score_many(cands)):
                scored[_key(c)] = (float(v), c)

        def mutate(n: int) -> list[np.ndarray]:  # (1 + lambda): level switches of the best so far
            parent = max(scored.values(), key=lambda t: t[0])[1]
            return [space.project(self._level_switch(space.to_x(parent), lo, hi, rng), budget) for _ in range(n)]

        start = [space.project(x, budget) for x in solver.population]  # the seeds and their perturbations
        strategy = self.options.search_strategy
        evo = strategy in ("evopress", "guided") and len(lo) >= 2
        pbar = progress_bar(total=evals, desc=f"{desc} ({strategy})", enabled=self.progress)
        if strategy == "guided" and evo:
            if guide is None:
                raise ValueError("search_strategy='guided' ranks its moves by an estimate of the score that this "
                                 "caller does not provide (prune_lm does): use 'evopress', 'de' or 'random'")
            spent = self._guided(start, space, guide, mutate, score, scored, evals, solver.popsize, pbar)
        elif screen is not None and evo:
            spent = self._screened(start, mutate, score, scored, screen, evals, pbar)
        else:
            score(start)
            spent, lam = len(start), solver.popsize
            pbar.update(spent)
            while spent < evals:
                n = min(lam, evals - spent)
                kids = mutate(n) if evo else [space.project(lo + rng.random(len(lo)) * (hi - lo), budget)
                                              for _ in range(n)]
                score(kids)
                spent += n
                pbar.update(n)
        pbar.close()
        self.searched = int(round(spent))
        return [c for _, c in sorted(scored.values(), key=lambda t: -t[0])]

    def _screened(self, start: list[np.ndarray], mutate: Callable[[int], list[np.ndarray]],
                  score: Callable[[list[np.ndarray]], None], scored: dict, screen: Screen, evals: int,
                  pbar) -> float:
        """EvoPress's multi-step selection (see :class:`Screen`): the start population, then each
        generation's offspring, screened; the best ``survivors`` not yet scored are scored in full. Runs
        while a whole generation fits the budget; returns the evaluations spent (screenings at their cost)."""
        spent, gen, cands, stale = 0.0, 0, start, 0
        while stale < 100:  # a parent whose every neighbour is scored already: nothing left to find
            fresh = [c for k, c in {_key(c): c for c in cands}.items() if k not in scored]
            stale = 0 if fresh else stale + 1
            cost = len(fresh) * screen.cost + min(screen.survivors, len(fresh))
            if gen > 0 and spent + cost > evals:
                return spent
            if fresh:
                cheap = np.array([screen.score(c, gen) for c in fresh], dtype=float)
                score([fresh[i] for i in np.argsort(-cheap, kind="stable")[:screen.survivors]])
                self.screened += len(fresh)
            spent += cost
            gen += 1
            pbar.update(cost)
            cands = mutate(screen.offspring)
        return spent

    def _guided(self, start: list[np.ndarray], space: KeepSpace, guide: Guide,
                mutate: Callable[[int], list[np.ndarray]], score: Callable[[list[np.ndarray]], None], scored: dict,
                evals: int, lam: int, pbar) -> float:
        """(1 + lambda) from the best so far, its offspring the ``lam`` moves ``guide`` ranks best among every
        transfer of weights from one layer to another (:data:`GUIDED_STEP` of the smaller range, 1-3 steps:
        EvoPress's level switches, with the budget kept exactly by moving the same number of weights). The
        estimate is remade whenever the parent changes; while the parent stays, the next moves down its
        ranking are scored; once every ranked move is scored, random level switches. Returns evaluations spent."""
        score(start)
        spent, parent_key, ranked, pos = float(len(start)), None, [], 0
        pbar.update(len(start))
        while spent < evals:
            best = max(scored, key=lambda k: scored[k][0])
            if best != parent_key:
                if spent + guide.cost + 1 > evals:
                    break
                parent_key, parent = best, scored[best][1]
                ranked, pos = guided_moves(space, parent, guide.estimate(parent)), 0
                spent += guide.cost
                pbar.update(guide.cost)
            n, kids = int(min(lam, evals - spent)), []
            while len(kids) < n and pos < len(ranked):
                (i, j, d), pos = ranked[pos], pos + 1
                kid = np.array(parent, dtype=np.int64)
                kid[i] -= d
                kid[j] += d
                if _key(kid) not in scored:
                    kids.append(kid)
            kids = kids or mutate(n)
            score(kids)
            spent += len(kids)
            pbar.update(len(kids))
        return spent

    @staticmethod
    def _level_switch(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """EvoPress's mutation: one layer one to three levels (5% of its range each) sparser, another as
        much denser; the projection onto the budget then keeps it exact."""
        x = np.array(x, dtype=float)
        i, j = rng.choice(len(x), 2, replace=False)
        step = 0.05 * int(rng.integers(1, 4))
        x[i] = min(hi[i], x[i] + step * (hi[i] - lo[i]))
        x[j] = max(lo[j], x[j] - step * (hi[j] - lo[j]))
        return x

    def _rescore(self, ranked: list[np.ndarray], rescore: Callable[[np.ndarray], float], top: int,
                 include: Sequence[np.ndarray] = (), fallback: bool = False) -> np.ndarray:
        """The best by ``rescore`` of the ``top`` first distinct candidates of ``ranked`` and of
        ``include`` (ties: the search's order, then ``include``'s); with ``fallback``, by the search's own
        scores when ``rescore`` raised none of them (recorded in :attr:`fell_back`)."""
        picked: dict[tuple[int, ...], np.ndarray] = {}
        for c in ranked:
            picked.setdefault(tuple(int(v) for v in c), c)
            if len(picked) == top:
                break
        for c in include:
            picked.setdefault(tuple(int(v) for v in c), c)
        for key, c in picked.items():
            self.rescored[key] = float(rescore(c))
        after = {k: self.rescored[k] for k in picked}
        before = {k: self.cache[k] for k in picked if k in self.cache}
        self.fell_back = fallback and len(before) == len(picked) and uninformative(after, before)
        best = choose(after, set(), before=before if self.fell_back else None)
        log.info("re-scored the %d finalists: %s", len(picked),
                 ", ".join(f"{self.rescored[k]:.4f}" for k in picked))
        return picked[best]

    def minimise(self, solver: DifferentialEvolution, space: KeepSpace, limit: float, *, penalty: Optional[float] = None,
                 desc: str = "DE") -> np.ndarray:
        """Accuracy form: the fewest kept weights with score >= ``limit`` (Deb's feasibility rules), or
        with ``penalty=a`` the minimum of ``a (1 - score) + (1 - a) density``."""
        total = float(space.numels.sum())

        def evaluate_batch(xs, parents):
            counts = [space.to_counts(x) for x in xs]
            floors = None if parents is None else [
                self._floor(float(c.sum()) / total, fp, vp, limit, penalty) for c, fp, vp in zip(counts, *parents)]
            f, v = [], []
            for c, score in zip(counts, self.score_many(counts, floors)):
                dens = float(c.sum()) / total
                if penalty is not None:
                    f.append(penalty * (1.0 - score) + (1.0 - penalty) * dens)
                    v.append(0.0)
                else:
                    f.append(dens)
                    v.append(max(0.0, limit - score))
            return f, v, (np.array([space.to_x(c) for c in counts]) if space.repairs else None)

        self._run(solver, evaluate_batch, desc)
        return space.to_counts(solver.population[solver.best_index()])

    @staticmethod
    def _floor(density: float, f_parent: float, v_parent: float, limit: float,
               penalty: Optional[float]) -> Optional[float]:
        """Accuracy form: the score a trial of this density needs to replace its parent under the
        solver's selection (``de.better``); inf when no score would do, None when any would."""
        if penalty is not None:  # a (1 - acc) + (1 - a) density <= f_parent
            if penalty == 0.0:
                return None if density <= f_parent else math.inf
            return 1.0 - (f_parent - (1.0 - penalty) * density) / penalty
        if v_parent <= 0.0:  # feasible parent: the trial must be feasible and no denser
            return limit if density <= f_parent else math.inf
        return limit - v_parent  # infeasible parent: the trial's violation must be no larger

    def info(self, solver: DifferentialEvolution) -> dict[str, Any]:
        """The search's record for the history."""
        r = solver.result()
        if self.searched is not None:
            return {"search_strategy": self.options.search_strategy, "nfev": self.nfev, "candidates": self.searched,
                    "screened": self.screened,
                    "early_rejected": self.rejected, "skipped": self.skipped, "images_saved": self.images_saved}
        return {"nfev": r.nfev, "nit": r.nit, "best_fun": r.fun, "best_violation": r.violation,
                "message": r.message, "history": [h["best_fun"] for h in r.history],
                "early_rejected": self.rejected, "skipped": self.skipped, "images_saved": self.images_saved}


def guided_moves(space: KeepSpace, parent: np.ndarray,
                 change: Callable[[int, int], float]) -> list[tuple[int, int, int]]:
    """Every transfer of weights from one layer of ``parent`` to another, as ``(from, to, weights)``:
    :data:`GUIDED_STEP` of the smaller layer's range, 1-3 steps, within the bounds (the total stays exact),
    best predicted first by ``change`` (see :class:`Guide`)."""
    parent = np.asarray(parent, dtype=np.int64)
    room_down, room_up = parent - space.min_keep, space.max_keep - parent
    span = space.max_keep - space.min_keep
    memo: dict[tuple[int, int], float] = {}

    def at(i: int, k: int) -> float:
        if (i, k) not in memo:
            memo[(i, k)] = float(change(i, k))
        return memo[(i, k)]

    moves = {}
    for i in range(len(parent)):
        for j in range(len(parent)):
            for steps in (1, 2, 3):
                d = min(int(round(GUIDED_STEP * steps * min(span[i], span[j]))), int(room_down[i]), int(room_up[j]))
                if i != j and d > 0 and (i, j, d) not in moves:
                    moves[(i, j, d)] = at(i, int(parent[i]) - d) + at(j, int(parent[j]) + d)
    return sorted(moves, key=lambda m: -moves[m])


def start_search(backend: Backend, options: SearchOptions, rng: np.random.Generator, space: KeepSpace,
                 seeds: Sequence[np.ndarray] | Callable[[Allocator], Sequence[np.ndarray]], maxfun: Optional[int], *,
                 saved: Optional[dict[str, Any]] = None, progress: bool = False, deadline: Optional[float] = None,
                 on_generation: Optional[Callable[[Allocator, DifferentialEvolution], None]] = None,
                 ) -> tuple[Allocator, DifferentialEvolution]:
    """The one search set-up of every pruner and adapter: an :class:`Allocator` on ``backend`` and its
    solver, either fresh from ``seeds`` (a list, or a callable given the allocator, called only for a
    fresh start: it may score candidates first) or as a checkpoint left it (``saved``: a
    :func:`search_state` dict; ``rng`` is put back to where it stood when that solver was made)."""
    search = Allocator(backend, options, rng, progress=progress, deadline=deadline, on_generation=on_generation)
    if saved is not None:
        search.load_state_dict(saved)
        rng.bit_generator.state = saved["rng"]
        return search, DifferentialEvolution.from_state(saved["solver"])
    start = seeds(search) if callable(seeds) else seeds
    return search, search.solver(space, list(start), maxfun)


def search_state(search: Allocator, solver: DifferentialEvolution, rng_state: dict[str, Any],
                 **extra: Any) -> dict[str, Any]:
    """What a checkpoint keeps of a running search (plain data; :func:`start_search`'s ``saved``):
    the solver, the allocator's cache and counters, the RNG as it stood once the solver existed, and
    the caller's ``extra``."""
    return {"solver": solver.state_dict(), **search.state_dict(), "rng": rng_state, **extra}
