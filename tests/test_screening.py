"""EvoPress's multi-step selection in the allocator (``Screen``): offspring screened cheaply, only the best
few scored in full, the budget counted in full evaluations and kept exactly."""
from __future__ import annotations

import numpy as np
import pytest

from de_plugin.evaluation import SerialBackend
from de_plugin.search.allocator import KeepSpace, Screen, SearchOptions, start_search
from de_plugin.search.budget import total_keep


class Quadratic:
    """A scorer with a known optimum: keep-counts near ``target``; counts every full score."""

    def __init__(self, target: np.ndarray):
        self.target, self.calls = target, 0

    def reset(self) -> None: ...
    def restore(self) -> None: ...

    def score(self, counts, floor=None) -> float:
        self.calls += 1
        return -float(np.sum((np.asarray(counts) - self.target) ** 2))


def search(screen_fn, survivors: int = 2, offspring: int = 16, evals: int = 60, seed: int = 0):
    numels = np.full(6, 1000)
    space = KeepSpace(numels, np.full(6, 10), numels, [(0.0, 0.99)] * 6)
    budget = total_keep(numels, 0.7)
    target = np.array([100, 500, 300, 200, 600, 100])  # keeps 1,800: the budget
    scorer = Quadratic(target)
    o = SearchOptions(search_strategy="evopress", population=offspring, generations=1000, max_evals=evals)
    rng = np.random.default_rng(seed)
    uniform = space.fit(np.full(6, 0.3), budget, is_density=True)
    alloc, solver = start_search(SerialBackend(scorer), o, rng, space, [uniform], evals)
    screen = None if screen_fn is None else Screen(lambda c, g: screen_fn(c, g, target), offspring, survivors, 0.25)
    best = alloc.maximise(solver, space, budget, screen=screen)
    return best, alloc, scorer, budget, target


def noisy(counts, gen, target):
    rng = np.random.default_rng(gen)
    return -float(np.sum((np.asarray(counts) - target) ** 2)) + rng.normal(0, 1000)


def test_screened_search_scores_only_the_survivors_in_full_and_keeps_the_budget():
    best, alloc, scorer, budget, *_ = search(noisy, survivors=2, offspring=16, evals=60)
    assert int(best.sum()) == budget
    gens = alloc.screened / 16  # the start population is 16 too
    assert alloc.screened > 0 and scorer.calls == alloc.nfev
    assert alloc.nfev <= 2 * np.ceil(gens)  # survivors only: 2 per generation
    assert alloc.nfev + 0.25 * alloc.screened <= 60  # the budget, in full evaluations
    assert alloc.nfev + 0.25 * alloc.screened > 60 - 6  # ... all of it a whole generation (16 x 0.25 + 2) allows


def test_screening_finds_more_for_the_same_evaluations_than_scoring_every_offspring():
    """A cheap score that ranks like the full one lets 4x more mutations be tried for the same budget."""
    exact = lambda c, g, t: -float(np.sum((np.asarray(c) - t) ** 2))  # noqa: E731
    wins = 0
    for seed in range(5):
        s, _, _, _, t = search(exact, survivors=2, offspring=16, evals=60, seed=seed)
        p, *_ = search(None, offspring=16, evals=60, seed=seed)
        wins += np.sum((s - t) ** 2) < np.sum((p - t) ** 2)
    assert wins >= 4


def test_more_survivors_than_offspring_is_refused():
    with pytest.raises(ValueError, match="survivors"):
        Screen(lambda c, g: 0.0, offspring=4, survivors=5, cost=0.25)
