"""DE engine tests in scipy's style: exact operators on hand-set populations, validation,
budgets, repeatability, constraints, state round trips, and convergence against scipy."""
import json

import numpy as np
import pytest
from scipy.optimize import differential_evolution as scipy_de, rosen

from de_plugin.search.de import DifferentialEvolution, better, differential_evolution


def hand_set(strategy, F=0.5, CR=0.9):
    s = DifferentialEvolution([(-10, 10)] * 3, popsize=5, strategy=strategy, mutation=F, recombination=CR, seed=1)
    s.population = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [-1.0, 0.5, 2.0], [3.0, -3.0, 1.0]])
    s.fun = np.array([5.0, 1.0, 3.0, 4.0, 2.0])  # member 1 is best
    s.violation = np.zeros(5)
    return s


def test_rand1_mutant_exact():
    s = hand_set("rand1bin")
    np.testing.assert_allclose(s.mutant(0, [1, 2, 3]), [1 + 0.5 * 3, 2 + 0.5 * 3.5, 3 + 0.5 * 4])


def test_best1_mutant_exact():
    s = hand_set("best/1/bin")
    np.testing.assert_allclose(s.mutant(0, [2, 3]), [1 + 0.5 * 3, 2 + 0.5 * 3.5, 3 + 0.5 * 4])


def test_current_to_best1_mutant_exact():
    s = hand_set("current-to-best/1/bin")
    # x_4 + F (x_best - x_4) + F (x_2 - x_3)
    expected = np.array([3, -3, 1]) + 0.5 * (np.array([1, 2, 3]) - [3, -3, 1]) + 0.5 * (np.array([2, 4, 6]) - [-1, 0.5, 2])
    np.testing.assert_allclose(s.mutant(4, [2, 3]), expected)


def test_best_index_uses_feasibility_rules():
    s = hand_set("best1bin")
    s.violation = np.array([0.0, 0.2, 0.0, 0.0, 0.0])  # the lowest objective is infeasible
    assert s.best_index() == 4


def test_binomial_crossover_exact():
    s = hand_set("rand1bin", CR=0.5)
    target, mutant = np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])
    np.testing.assert_array_equal(s.crossover(target, mutant, np.array([0.1, 0.9, 0.7]), j_rand=2), [1, 0, 1])
    s.recombination = 0.0
    np.testing.assert_array_equal(s.crossover(target, mutant, np.array([0.1, 0.1, 0.1]), j_rand=1), [0, 1, 0])
    s.recombination = 1.0
    np.testing.assert_array_equal(s.crossover(target, mutant, np.array([0.99, 0.5, 0.0]), j_rand=0), [1, 1, 1])


@pytest.mark.parametrize("mode,expected", [("clip", [0.0, 1.0, 0.5]), ("reflect", [0.25, 0.75, 0.5])])
def test_bound_handling_exact(mode, expected):
    s = DifferentialEvolution([(0, 1)] * 3, popsize=4, bound_handling=mode, seed=0)
    np.testing.assert_allclose(s.repair(np.array([-0.25, 1.25, 0.5]), np.zeros(3)), expected)


def test_bound_handling_random_stays_inside():
    s = DifferentialEvolution([(0, 1)] * 3, popsize=4, bound_handling="random", seed=0)
    y = s.repair(np.array([-5.0, 7.0, 0.5]), np.zeros(3))
    assert np.all((y >= 0) & (y <= 1)) and y[2] == 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"strategy": "rand2exp"}, "unknown strategy"),
        ({"popsize": 3}, "popsize"),
        ({"mutation": 2.5}, "mutation"),
        ({"recombination": -0.1}, "recombination"),
        ({"bound_handling": "wrap"}, "bound_handling"),
        ({"maxfun": 0}, "maxfun"),
        ({"stall": -1}, "stall"),
        ({"x0": [[0.0]]}, "x0"),
    ],
)
def test_parameter_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DifferentialEvolution([(0, 1), (0, 1)], **kwargs)


def test_bad_bounds():
    with pytest.raises(ValueError, match="low <= high"):
        DifferentialEvolution([(1, 0)])
    with pytest.raises(ValueError, match="bounds"):
        DifferentialEvolution([1, 2, 3])


def sphere(x):
    return float(np.sum(np.asarray(x) ** 2))


def rastrigin(x):
    x = np.asarray(x)
    return float(10 * len(x) + np.sum(x**2 - 10 * np.cos(2 * np.pi * x)))


@pytest.mark.parametrize("maxfun", [1, 7, 10, 53])
def test_exact_nfev_under_maxfun(maxfun):
    calls = []
    res = differential_evolution(lambda x: calls.append(1) or sphere(x), [(-1, 1)] * 2, popsize=10, maxiter=100,
                                 maxfun=maxfun, seed=0)
    assert res.nfev == maxfun == len(calls)
    assert "function evaluations" in res.message


def test_nfev_and_nit_without_budget():
    res = differential_evolution(sphere, [(-1, 1)] * 2, popsize=8, maxiter=6, seed=0)
    assert res.nit == 6 and res.nfev == 8 * 7 and len(res.history) == 7


def test_seed_repeatability():
    a = differential_evolution(rastrigin, [(-5, 5)] * 3, popsize=10, maxiter=20, seed=42)
    b = differential_evolution(rastrigin, [(-5, 5)] * 3, popsize=10, maxiter=20, seed=42)
    c = differential_evolution(rastrigin, [(-5, 5)] * 3, popsize=10, maxiter=20, seed=43)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.fun == b.fun and a.history == b.history
    assert not np.array_equal(a.x, c.x)


def test_x0_seeds_population():
    s = DifferentialEvolution([(0, 1)] * 2, popsize=6, x0=[[0.25, 0.75], [2.0, -1.0]], seed=0)
    np.testing.assert_array_equal(s.population[:2], [[0.25, 0.75], [1.0, 0.0]])


def test_deb_rules():
    assert better(5.0, 0.0, 1.0, 0.1)  # feasible beats infeasible
    assert not better(1.0, 0.1, 5.0, 0.0)
    assert better(1.0, 0.0, 2.0, 0.0) and not better(2.0, 0.0, 1.0, 0.0)
    assert better(9.0, 0.1, 1.0, 0.2)  # among infeasible, smaller violation wins


def test_constrained_problem_solved_with_feasibility_rules():
    # min x^2 + y^2  s.t.  x + y >= 1  ->  (0.5, 0.5)
    res = differential_evolution(sphere, [(-2, 2)] * 2, constraint=lambda x: max(0.0, 1.0 - x[0] - x[1]),
                                 popsize=20, maxiter=150, seed=0)
    assert res.feasible
    np.testing.assert_allclose(res.x, [0.5, 0.5], atol=0.02)


def test_tell_validates_and_accepts_repaired_x():
    s = DifferentialEvolution([(0, 1)] * 2, popsize=4, seed=0)
    xs = s.ask()
    with pytest.raises(ValueError, match="expected 4"):
        s.tell([1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        s.tell([1.0, 2.0, float("nan"), 0.0])
    repaired = np.full_like(xs, 0.5)
    s.tell([1.0, 2.0, 3.0, 4.0], x=repaired)
    np.testing.assert_array_equal(s.population, repaired)
    with pytest.raises(RuntimeError, match="without a pending"):
        s.tell([1.0] * 4)


def test_state_roundtrip_continues_identically():
    def drive(solver, gens):
        for _ in range(gens):
            xs = solver.ask()
            solver.tell([rastrigin(x) for x in xs])

    full = DifferentialEvolution([(-5, 5)] * 4, popsize=10, maxiter=30, seed=7)
    drive(full, 12)
    half = DifferentialEvolution([(-5, 5)] * 4, popsize=10, maxiter=30, seed=7)
    drive(half, 5)
    half.ask()  # a pending generation is part of the state too
    state = json.loads(json.dumps(half.state_dict()))
    resumed = DifferentialEvolution.from_state(state)
    drive(resumed, 7)
    np.testing.assert_array_equal(resumed.population, full.population)
    np.testing.assert_array_equal(resumed.fun, full.fun)
    assert resumed.nfev == full.nfev and resumed.nit == full.nit
    with pytest.raises(ValueError, match="version"):
        DifferentialEvolution.from_state({"population": []})


@pytest.mark.parametrize(
    "func,bounds",
    [(sphere, [(-5, 5)] * 5), (rosen, [(-2, 2)] * 4), (rastrigin, [(-5.12, 5.12)] * 4)],
    ids=["sphere", "rosenbrock", "rastrigin"],
)
@pytest.mark.parametrize("strategy", ["rand1bin", "best1bin"])
def test_convergence_no_worse_than_scipy(func, bounds, strategy):
    """Median best value over 5 seeds at equal evaluations (population 20, 60 generations)."""
    ours, theirs = [], []
    for seed in range(5):
        r = differential_evolution(func, bounds, popsize=20, maxiter=60, strategy=strategy, seed=seed)
        s = scipy_de(func, bounds, popsize=20 // len(bounds), maxiter=60, strategy=strategy, mutation=0.5,
                     recombination=0.9, tol=0, polish=False, init="latinhypercube", updating="deferred", seed=seed)
        assert r.nfev == s.nfev
        ours.append(r.fun)
        theirs.append(s.fun)
    assert np.median(ours) <= 2.0 * np.median(theirs) + 1e-12


def test_stall_stops_once_the_best_stops_improving():
    flat = differential_evolution(lambda x: 1.0, [(-1, 1)] * 3, popsize=6, maxiter=50, seed=0, stall=3)
    assert flat.nit == 3 and "did not improve for 3" in flat.message
    def coarse(x):  # a plateau once within 0.1 of the optimum, as validation accuracy plateaus
        return float(np.floor(10 * sphere(x)) / 10)

    full = differential_evolution(coarse, [(-1, 1)] * 3, popsize=8, maxiter=40, seed=0)
    early = differential_evolution(coarse, [(-1, 1)] * 3, popsize=8, maxiter=40, seed=0, stall=4)
    assert early.nit <= full.nit
    h = [g["best_fun"] for g in early.history]
    assert early.nit < 40 and h[-1] == h[-5]  # stopped for the stall: 4 generations without a better best
    assert all(h[j] < h[j - 4] for j in range(4, len(h) - 1))  # and not before: every earlier window improved
    # same seed, same stream: identical up to the stop
    assert [g["best_fun"] for g in full.history[: len(h)]] == h


def test_stall_survives_a_resume():
    a = DifferentialEvolution([(-1, 1)] * 2, popsize=6, maxiter=30, seed=2, stall=2)
    a.tell([sphere(x) for x in a.ask()])
    b = DifferentialEvolution.from_state(a.state_dict())
    assert b.stall == 2
