"""Differential evolution with an ask/tell interface and constraint handling.

Why our own engine and not ``scipy.optimize.differential_evolution``: the pruning search needs
(1) ask/tell so candidates can be scored by any backend (serial, batched, workers),
(2) Deb's feasibility rules for "accuracy >= reference - eps" constraints,
(3) a population seeded with known-good allocations (the baselines), and
(4) its whole state as plain data so a search can be checkpointed and resumed.
scipy offers none of these together. The public function and result mirror scipy's.

Conventions: minimisation; a candidate is *feasible* when its constraint violation is 0.
Deb's rules (Deb 2000): feasible beats infeasible; two feasible compare by objective; two
infeasible compare by violation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

STRATEGIES = ("rand1bin", "best1bin", "currenttobest1bin")
BOUND_HANDLING = ("clip", "reflect", "random")
#: ``jde``: Brest et al. 2006's self-adaptive F and CR, one pair per member, re-drawn with
#: probability 0.1 per trial (F in [0.1, 1], CR in [0, 1]) and kept when the trial wins: no F / CR
#: to tune per model depth.
ADAPTATIONS = ("none", "jde")
JDE_TAU = 0.1
_STRATEGY_ALIASES = {
    "rand/1/bin": "rand1bin",
    "best/1/bin": "best1bin",
    "current-to-best/1/bin": "currenttobest1bin",
}


def better(f_a: float, v_a: float, f_b: float, v_b: float) -> bool:
    """True when (f_a, v_a) is at least as good as (f_b, v_b) under Deb's feasibility rules."""
    if v_a <= 0.0 and v_b <= 0.0:
        return f_a <= f_b
    if v_a <= 0.0 < v_b:
        return True
    if v_b <= 0.0 < v_a:
        return False
    return v_a <= v_b


def _rank_key(f: float, v: float) -> tuple[int, float]:
    """Sort key implementing Deb's rules: feasible first by objective, then infeasible by violation."""
    return (0, f) if v <= 0.0 else (1, v)


@dataclass
class DEResult:
    """Outcome of a search, shaped like ``scipy.optimize.OptimizeResult``."""

    x: np.ndarray
    fun: float
    violation: float
    nfev: int
    nit: int
    success: bool
    message: str
    history: list[dict[str, float]] = field(default_factory=list)
    population: np.ndarray | None = None
    population_fun: np.ndarray | None = None

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0


def _check_settings(b: np.ndarray, popsize: Any, strategy: str, mutation: float, recombination: float, maxiter: int,
                    maxfun: Optional[int], bound_handling: str, init: str, adaptation: str, stall: int) -> None:
    """Every solver setting checked before any work, each error saying what is valid."""
    if b.ndim != 2 or b.shape[1] != 2 or b.shape[0] < 1:
        raise ValueError(f"bounds must be a sequence of (low, high) pairs, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b[:, 0] > b[:, 1]):
        raise ValueError("every bound must be finite with low <= high")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if bound_handling not in BOUND_HANDLING:
        raise ValueError(f"unknown bound_handling {bound_handling!r}; choose one of {BOUND_HANDLING}")
    if adaptation not in ADAPTATIONS:
        raise ValueError(f"unknown adaptation {adaptation!r}; choose one of {ADAPTATIONS}")
    if init not in ("latinhypercube", "random"):
        raise ValueError("init must be 'latinhypercube' or 'random'")
    if not isinstance(popsize, (int, np.integer)) or popsize < 4:
        raise ValueError(f"popsize must be an integer >= 4 (DE needs 3 partners), got {popsize!r}")
    if not 0.0 <= mutation <= 2.0:
        raise ValueError(f"mutation (F) must lie in [0, 2], got {mutation}")
    if not 0.0 <= recombination <= 1.0:
        raise ValueError(f"recombination (CR) must lie in [0, 1], got {recombination}")
    if maxiter < 0:
        raise ValueError("maxiter must be >= 0")
    if maxfun is not None and maxfun < 1:
        raise ValueError("maxfun must be >= 1")
    if stall < 0:
        raise ValueError("stall must be >= 0 (0: never stop for lack of progress)")


class DifferentialEvolution:
    """DE solver driven by ``ask()`` / ``tell(fun, violation)``.

    The first ``ask()`` returns the initial population; each later ``ask()`` returns one trial
    vector per population member (fewer when ``maxfun`` would be exceeded, so ``nfev`` never
    passes it). Selection is generation-synchronous ("deferred" updating in scipy's words),
    which is what lets a whole generation be scored in parallel.
    """

    def __init__(
        self,
        bounds: Sequence[tuple[float, float]],
        *,
        popsize: int = 20,
        strategy: str = "rand1bin",
        mutation: float = 0.5,
        recombination: float = 0.9,
        maxiter: int = 50,
        maxfun: int | None = None,
        tol: float = 0.0,
        atol: float = 0.0,
        bound_handling: str = "clip",
        init: str = "latinhypercube",
        x0: np.ndarray | Sequence[Sequence[float]] | None = None,
        seed: int | None = None,
        adaptation: str = "none",
        stall: int = 0,
    ) -> None:
        b = np.asarray(bounds, dtype=float)
        strategy = _STRATEGY_ALIASES.get(strategy, strategy)
        _check_settings(b, popsize, strategy, mutation, recombination, maxiter, maxfun, bound_handling, init,
                        adaptation, stall)
        self.lower, self.upper = b[:, 0].copy(), b[:, 1].copy()
        self.dim = b.shape[0]
        self.popsize = int(popsize)
        self.strategy = strategy
        self.mutation = float(mutation)
        self.recombination = float(recombination)
        self.maxiter = int(maxiter)
        self.maxfun = None if maxfun is None else int(maxfun)
        self.tol, self.atol = float(tol), float(atol)
        self.bound_handling = bound_handling
        self.adaptation = adaptation
        self.stall = int(stall)
        self.rng = np.random.default_rng(seed)
        # per-member F and CR (constant unless adaptation == "jde"); the pending trials' own pair
        self.F = np.full(self.popsize, self.mutation)
        self.CR = np.full(self.popsize, self.recombination)
        self._trial_F, self._trial_CR = self.F.copy(), self.CR.copy()
        self.nfev = 0
        self.nit = 0
        self.history: list[dict[str, float]] = []
        self.population = self._initial_population(init, x0)
        self.fun = np.full(self.popsize, np.inf)
        self.violation = np.full(self.popsize, np.inf)
        self._pending: np.ndarray | None = None
        self._pending_is_init = False
        self._initialised = False

    # ------------------------------------------------------------------ population
    def _initial_population(self, init: str, x0: Any) -> np.ndarray:
        n, d = self.popsize, self.dim
        if init == "latinhypercube":
            seg = 1.0 / n
            samples = seg * self.rng.uniform(size=(n, d)) + np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
            pop = np.empty_like(samples)
            for j in range(d):
                pop[:, j] = samples[self.rng.permutation(n), j]
        else:
            pop = self.rng.uniform(size=(n, d))
        pop = self.lower + pop * (self.upper - self.lower)
        if x0 is not None:
            seeds = np.atleast_2d(np.asarray(x0, dtype=float))
            if seeds.shape[1] != d:
                raise ValueError(f"x0 rows must have {d} entries, got {seeds.shape[1]}")
            if seeds.shape[0] > n:
                raise ValueError(f"{seeds.shape[0]} seed vectors do not fit in a population of {n}")
            pop[: seeds.shape[0]] = np.clip(seeds, self.lower, self.upper)
        return pop

    # ------------------------------------------------------------------ operators
    def best_index(self) -> int:
        keys = [_rank_key(f, v) for f, v in zip(self.fun, self.violation)]
        return int(min(range(self.popsize), key=keys.__getitem__))

    def mutant(self, i: int, r: Sequence[int], best: int | None = None, F: float | None = None) -> np.ndarray:
        """Mutant vector for member ``i`` from partner indices ``r`` (before bound handling).

        Exposed with explicit indices so tests can check each strategy on a hand-set population.
        """
        p, F = self.population, (self.mutation if F is None else F)
        if self.strategy == "rand1bin":
            return p[r[0]] + F * (p[r[1]] - p[r[2]])
        best = self.best_index() if best is None else best
        if self.strategy == "best1bin":
            return p[best] + F * (p[r[0]] - p[r[1]])
        return p[i] + F * (p[best] - p[i]) + F * (p[r[0]] - p[r[1]])

    def crossover(self, target: np.ndarray, mutant: np.ndarray, u: np.ndarray, j_rand: int,
                  CR: float | None = None) -> np.ndarray:
        """Binomial crossover: take the mutant where ``u < CR`` and always at ``j_rand``."""
        take = u < (self.recombination if CR is None else CR)
        take[j_rand] = True
        return np.where(take, mutant, target)

    def repair(self, x: np.ndarray, base: np.ndarray) -> np.ndarray:
        """Bring a trial back inside the bounds (``clip``, ``reflect`` or ``random`` re-draw)."""
        lo, hi = self.lower, self.upper
        if self.bound_handling == "clip":
            return np.clip(x, lo, hi)
        out = x.copy()
        bad = (out < lo) | (out > hi)
        if not bad.any():
            return out
        if self.bound_handling == "random":
            out[bad] = lo[bad] + self.rng.uniform(size=int(bad.sum())) * (hi - lo)[bad]
            return out
        span = np.where(hi > lo, hi - lo, 1.0)
        y = (out - lo) % (2 * span)  # reflection folds into [0, 2*span)
        y = np.where(y > span, 2 * span - y, y)
        return np.where(hi > lo, lo + y, lo)

    def _trial(self, i: int) -> np.ndarray:
        F, CR = self.F[i], self.CR[i]
        if self.adaptation == "jde":  # the draws happen only in jde mode: "none" keeps its random stream
            a, b, c, d = self.rng.uniform(size=4)
            F = 0.1 + 0.9 * b if a < JDE_TAU else F
            CR = d if c < JDE_TAU else CR
        self._trial_F[i], self._trial_CR[i] = F, CR
        n_partners = 3 if self.strategy == "rand1bin" else 2
        choices = [k for k in range(self.popsize) if k != i]
        r = self.rng.choice(choices, size=n_partners, replace=False)
        m = self.mutant(i, r, F=F)
        u = self.rng.uniform(size=self.dim)
        j_rand = int(self.rng.integers(self.dim))
        return self.repair(self.crossover(self.population[i], m, u, j_rand, CR=CR), self.population[i])

    # ------------------------------------------------------------------ ask / tell
    @property
    def done(self) -> bool:
        return bool(self.stop_reason())

    def stop_reason(self) -> str:
        if self.maxfun is not None and self.nfev >= self.maxfun:
            return "Maximum number of function evaluations has been reached."
        if self._initialised and self.nit >= self.maxiter:
            return "Maximum number of iterations has been reached."
        if self._initialised and self._converged():
            return "Optimization terminated successfully (population converged)."
        if self._initialised and self._stalled():
            return f"Stopped: the best member did not improve for {self.stall} generations."
        return ""

    def _stalled(self) -> bool:
        """No strict improvement of the best (Deb's order) over the last ``stall`` generations:
        the search is spending evaluations without moving (the cost lever at depth)."""
        if self.stall <= 0 or len(self.history) <= self.stall:
            return False
        then, now = self.history[-1 - self.stall], self.history[-1]
        return not (_rank_key(now["best_fun"], now["best_violation"])
                    < _rank_key(then["best_fun"], then["best_violation"]))

    def _converged(self) -> bool:
        if self.tol <= 0.0 and self.atol <= 0.0:
            return False
        if np.any(self.violation > 0) or not np.all(np.isfinite(self.fun)):
            return False
        return bool(np.std(self.fun) <= self.atol + self.tol * abs(np.mean(self.fun)))

    def ask(self) -> np.ndarray:
        """Candidates to evaluate next (the initial population first, then one generation)."""
        if self._pending is not None:
            return self._pending.copy()
        if self.done:
            raise RuntimeError(f"the search has finished: {self.stop_reason()}")
        room = None if self.maxfun is None else self.maxfun - self.nfev
        if not self._initialised:
            batch = self.population.copy()
            self._pending_is_init = True
        else:
            batch = np.array([self._trial(i) for i in range(self.popsize)])
            self._pending_is_init = False
        if room is not None:
            batch = batch[:room]
        self._pending = batch
        return batch.copy()

    def parents(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(objective, violation) of the members the pending trials compete with (trial i against
        member i), or None while the pending batch is the initial population. Lets a caller skip
        work on trials that cannot win; selection only needs to know that they lose."""
        if self._pending is None or self._pending_is_init:
            return None
        return self.fun.copy(), self.violation.copy()

    def tell(
        self, fun: Sequence[float], violation: Sequence[float] | None = None, x: np.ndarray | None = None
    ) -> None:
        """Report objective values (and constraint violations, 0 = feasible) for the last ``ask()``.

        ``x``, when given, are the vectors actually evaluated after a repair (e.g. projection onto
        a budget); they replace the asked ones so the population holds what was scored.
        """
        if self._pending is None:
            raise RuntimeError("tell() without a pending ask()")
        if x is not None:
            x = np.asarray(x, dtype=float)
            if x.shape != self._pending.shape:
                raise ValueError(f"x must have shape {self._pending.shape}, got {x.shape}")
            self._pending = np.clip(x, self.lower, self.upper)
        f = np.asarray(fun, dtype=float).reshape(-1)
        v = np.zeros_like(f) if violation is None else np.asarray(violation, dtype=float).reshape(-1)
        n = len(self._pending)
        if f.shape[0] != n or v.shape[0] != n:
            raise ValueError(f"expected {n} objective and violation values, got {f.shape[0]} and {v.shape[0]}")
        if np.any(np.isnan(f)) or np.any(np.isnan(v)):
            raise ValueError("objective values and violations must not be NaN")
        if np.any(v < 0):
            raise ValueError("constraint violations must be >= 0 (0 means feasible)")
        self.nfev += n
        if self._pending_is_init:
            self.population[:n] = self._pending
            self.fun[:n], self.violation[:n] = f, v
            self._initialised = True
        else:
            for i in range(n):
                if better(f[i], v[i], self.fun[i], self.violation[i]):
                    self.population[i] = self._pending[i]
                    self.fun[i], self.violation[i] = f[i], v[i]
                    self.F[i], self.CR[i] = self._trial_F[i], self._trial_CR[i]
            self.nit += 1
        self._pending = None
        b = self.best_index()
        self.history.append(
            {
                "nit": self.nit,
                "nfev": self.nfev,
                "best_fun": float(self.fun[b]),
                "best_violation": float(self.violation[b]),
                "mean_fun": float(np.mean(self.fun[np.isfinite(self.fun)])) if np.isfinite(self.fun).any() else math.inf,
                "feasible_fraction": float(np.mean(self.violation <= 0)),
            }
        )

    def result(self) -> DEResult:
        b = self.best_index()
        msg = self.stop_reason() or "Stopped before the budget was used (ask/tell driven)."
        return DEResult(
            x=self.population[b].copy(),
            fun=float(self.fun[b]),
            violation=float(self.violation[b]),
            nfev=self.nfev,
            nit=self.nit,
            success=bool(self.violation[b] <= 0.0),
            message=msg,
            history=list(self.history),
            population=self.population.copy(),
            population_fun=self.fun.copy(),
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the search bit-for-bit, as plain Python data."""
        return {
            "version": 1,
            "bounds": np.stack([self.lower, self.upper], 1).tolist(),
            "config": {
                "popsize": self.popsize,
                "strategy": self.strategy,
                "mutation": self.mutation,
                "recombination": self.recombination,
                "maxiter": self.maxiter,
                "maxfun": self.maxfun,
                "tol": self.tol,
                "atol": self.atol,
                "bound_handling": self.bound_handling,
                "adaptation": self.adaptation,
                "stall": self.stall,
            },
            "F": self.F.tolist(), "CR": self.CR.tolist(),
            "trial_F": self._trial_F.tolist(), "trial_CR": self._trial_CR.tolist(),
            "population": self.population.tolist(),
            "fun": self.fun.tolist(),
            "violation": self.violation.tolist(),
            "nfev": self.nfev,
            "nit": self.nit,
            "history": list(self.history),
            "initialised": self._initialised,
            "pending": None if self._pending is None else self._pending.tolist(),
            "pending_is_init": self._pending_is_init,
            "rng": self.rng.bit_generator.state,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DifferentialEvolution":
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a DifferentialEvolution state (missing or unknown 'version')")
        solver = cls(state["bounds"], **state["config"], seed=0)
        solver.population = np.asarray(state["population"], dtype=float)
        solver.fun = np.asarray(state["fun"], dtype=float)
        solver.violation = np.asarray(state["violation"], dtype=float)
        solver.nfev, solver.nit = int(state["nfev"]), int(state["nit"])
        solver.history = list(state["history"])
        solver._initialised = bool(state["initialised"])
        solver._pending = None if state["pending"] is None else np.asarray(state["pending"], dtype=float)
        solver._pending_is_init = bool(state["pending_is_init"])
        solver.rng.bit_generator.state = state["rng"]
        if "F" in state:  # states saved before adaptation existed hold the constant pair
            solver.F, solver.CR = np.asarray(state["F"], dtype=float), np.asarray(state["CR"], dtype=float)
            solver._trial_F = np.asarray(state["trial_F"], dtype=float)
            solver._trial_CR = np.asarray(state["trial_CR"], dtype=float)
        return solver


def differential_evolution(
    func: Callable[[np.ndarray], float],
    bounds: Sequence[tuple[float, float]],
    *,
    constraint: Callable[[np.ndarray], float] | None = None,
    callback: Callable[[DifferentialEvolution], bool | None] | None = None,
    **options: Any,
) -> DEResult:
    """Minimise ``func`` over a box, scipy-style; ``constraint(x)`` returns a violation >= 0.

    ``options`` are those of :class:`DifferentialEvolution` (popsize, strategy, mutation,
    recombination, maxiter, maxfun, tol, bound_handling, init, x0, seed, adaptation, stall). A ``callback``
    returning True stops the search after the current generation.
    """
    solver = DifferentialEvolution(bounds, **options)
    while not solver.done:
        xs = solver.ask()
        f = [float(func(x)) for x in xs]
        v = [float(constraint(x)) for x in xs] if constraint is not None else None
        solver.tell(f, v)
        if callback is not None and callback(solver):
            res = solver.result()
            res.message = "Stopped by callback."
            return res
    return solver.result()
