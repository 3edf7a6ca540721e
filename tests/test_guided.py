"""``search_strategy='guided'``: (1 + lambda) level switching whose offspring an estimate of the score ranks
(the allocator's ``Guide``), and the language-model estimate behind it (``TaylorGuide``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from de_plugin.demo.lm import TinyGPT
from de_plugin.evaluation import SerialBackend
from de_plugin.lm import DenseReference, LayerDatabase, collect_stats, decoder_layers, prune_lm
from de_plugin.lm.sensitivity import TaylorGuide, kl_gradient
from de_plugin.lm.width import prune_width
from de_plugin.lm.search import OneShotOptions
from de_plugin.search.allocator import Guide, KeepSpace, guided_moves, start_search
from de_plugin.search.budget import total_keep

NUMELS = np.array([1000, 4000, 1000, 4000, 2000, 2000])
TARGET = np.array([100, 1900, 600, 700, 300, 1200])  # keeps 4,800 of 14,000: the budget at 0.657 sparsity


class Separable:
    """A score whose optimum is known: minus the squared distance of each layer's count from ``TARGET``."""

    def __init__(self):
        self.calls = 0

    def reset(self) -> None: ...
    def restore(self) -> None: ...

    def score(self, counts, floor=None) -> float:
        self.calls += 1
        return -float(np.sum((np.asarray(counts) - TARGET) ** 2))


def space():
    return KeepSpace(NUMELS, np.full(6, 10), NUMELS, [(0.0, 0.99)] * 6)


def exact_change(parent):
    """The separable score's true change when layer i alone keeps k: a guide that cannot be wrong."""
    return lambda i, k: float((parent[i] - TARGET[i]) ** 2 - (k - TARGET[i]) ** 2)


def run(strategy: str, guide=None, evals: int = 120, seed: int = 0):
    sp, scorer = space(), Separable()
    budget = int(TARGET.sum())
    o = OneShotOptions(search_strategy=strategy, population=4, generations=1000, max_evals=evals)
    alloc, solver = start_search(SerialBackend(scorer), o, np.random.default_rng(seed), sp,
                                 [sp.fit(np.full(6, 1.0), budget, is_density=True)], evals)
    best = alloc.maximise(solver, sp, budget, guide=guide)
    return best, alloc, scorer, budget


def test_guided_moves_keep_the_budget_and_bounds_and_come_best_predicted_first():
    sp = space()
    parent = sp.fit(np.full(6, 0.5), 7000, is_density=True)
    change = exact_change(parent)
    moves = guided_moves(sp, parent, change)
    assert len(moves) == len(set(moves)) > 0
    gains = []
    for i, j, d in moves:
        kid = parent.copy()
        kid[i] -= d
        kid[j] += d
        assert kid.sum() == parent.sum() and np.all(kid >= sp.min_keep) and np.all(kid <= sp.max_keep)
        assert d in {round(0.05 * s * min(sp.max_keep[i] - sp.min_keep[i], sp.max_keep[j] - sp.min_keep[j]))
                     for s in (1, 2, 3)} or d in (parent[i] - sp.min_keep[i], sp.max_keep[j] - parent[j])
        gains.append(change(i, kid[i]) + change(j, kid[j]))
    assert gains == sorted(gains, reverse=True)


def test_a_guide_that_predicts_the_score_finds_more_than_random_switches_for_the_same_evaluations():
    for seed in range(3):
        g, alloc, scorer, budget = run("guided", Guide(lambda p: exact_change(np.asarray(p)), cost=3), seed=seed)
        e, *_ = run("evopress", seed=seed)
        assert int(g.sum()) == budget and scorer.calls == alloc.nfev
        assert np.sum((g - TARGET) ** 2) < 0.5 * np.sum((e - TARGET) ** 2)


def test_a_misleading_guide_still_never_returns_worse_than_its_start():
    """The estimate only orders the moves; the exact scores decide which one is kept."""
    wrong = Guide(lambda p: (lambda i, k: -exact_change(np.asarray(p))(i, k)), cost=3)
    g, alloc, scorer, budget = run("guided", wrong, evals=40)
    start = space().fit(np.full(6, 1.0), budget, is_density=True)
    assert scorer.score(g) >= scorer.score(start) and int(g.sum()) == budget


def test_guided_without_a_guide_is_refused():
    with pytest.raises(ValueError, match="does not provide"):
        run("guided", None)


# ------------------------------------------------------------------------------ the language-model estimate
@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = TinyGPT(vocab=16, d=16, layers=2, heads=2, context=16).eval()
    batches = [torch.randint(0, 16, (4, 12)) for _ in range(2)]
    return model, batches


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_taylor_estimate_is_the_second_order_expansion_at_the_parent(lm, method):
    """change(i, k) = -(g . dW + 1/2 sum F dW^2): g the KL gradient at the parent, dW the weights the in-layer
    method removes or gives back between the parent's count and k (counts that divide by the rows: exact)."""
    model, batches = lm
    layers = decoder_layers(model)
    db = LayerDatabase(layers, collect_stats(model, layers, batches), method)
    ref = DenseReference(model, batches)
    guide = TaylorGuide(model, layers, db, ref, upto=1, seed=0)
    parent = np.array([l.numel // 2 for l in layers])
    change = guide.estimate(parent)
    db.apply(parent)
    grads = kl_gradient(model, layers, ref, 1)
    db.restore()
    for i, l in enumerate(layers):
        rows = l.weight.shape[0]
        for keep in (parent[i] - 2 * rows, parent[i] + 3 * rows):
            dw = (db.weight(i, int(keep)) - db.weight(i, int(parent[i]))).float()
            want = -float((grads[i] * dw).sum() + 0.5 * (guide.fisher[i] * dw * dw).sum())
            assert change(i, int(keep)) == pytest.approx(want, rel=1e-4, abs=1e-9)
        assert change(i, int(parent[i])) == 0.0
    assert all(torch.equal(l.weight, w) for l, w in zip(layers, db.dense))  # the dense weights are back


def test_prune_lm_guided_meets_the_budget_and_counts_its_backward_passes(lm):
    model, batches = lm
    r = prune_lm(model, batches, 0.6, search_strategy="guided", max_evals=40, generations=1000, progress=False)
    assert r.sparsity == pytest.approx(0.6, abs=1e-3) and r.search["search_strategy"] == "guided"
    assert r.fitness <= min(r.seed_fitness.values()) + 1e-9
    # the dense Fisher and one gradient per parent, 3 evaluations each, besides the forward passes
    assert r.search["estimates"] >= 1
    assert r.evaluations == r.search["batches_forwarded"] + 3 * (1 + r.search["estimates"])
    assert r.search["nfev"] <= 40 - 3 * (1 + r.search["estimates"])  # the estimates come out of the budget


@pytest.mark.parametrize("call, match", [
    (lambda m, b: prune_lm(m, b, 0.6, search_strategy="guided", granularity="block", progress=False),
     "granularity='layer'"),
    (lambda m, b: prune_width(m, b, 0.3, search_strategy="guided", progress=False), "whole heads and units"),
])
def test_guided_where_it_cannot_estimate_is_refused_before_any_work(lm, call, match):
    model, batches = lm
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        call(model, batches)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_the_default_is_guided_per_layer_within_its_memory_and_evopress_otherwise(lm, monkeypatch, caplog):
    model, batches = lm
    kw = dict(max_evals=30, generations=1000, progress=False)
    assert prune_lm(model, batches, 0.6, **kw).search["search_strategy"] == "guided"
    assert prune_lm(model, batches, 0.6, granularity="block", **kw).search["search_strategy"] == "evopress"
    assert prune_lm(model, batches, 0.6, survivors=2, search_batches=2, **kw).search["search_strategy"] == "evopress"
    monkeypatch.setattr("de_plugin.lm.search.GUIDE_AUTO_BYTES", 16 * sum(l.numel for l in decoder_layers(model)) - 1)
    with caplog.at_level("INFO", logger="de_plugin"):
        assert prune_lm(model, batches, 0.6, **kw).search["search_strategy"] == "evopress"
    assert "search_strategy='guided' asks for it" in caplog.text
    assert prune_lm(model, batches, 0.6, search_strategy="guided", **kw).search["search_strategy"] == "guided"


def test_a_seed_that_beats_the_choice_at_the_exact_counts_is_the_result(lm, monkeypatch):
    """SparseGPT's candidates are scored at the database's levels; the result is compared with the seeds at the
    exact counts and is never worse than the best of them there."""
    model, batches = lm
    import de_plugin.lm.search as search
    real = search.search_counts

    def worst(*args, **kwargs):  # a search that returns a poor allocation: the first block at 90%, the second at 30%
        counts, info, evals = real(*args, **kwargs)
        space = args[3]
        half = len(counts) // 2
        return np.r_[space.min_keep[:half], space.max_keep[half:]], info, evals
    monkeypatch.setattr(search, "search_counts", worst)
    r = prune_lm(model, batches, 0.6, method="sparsegpt", max_evals=20, generations=1000, progress=False)
    assert r.search["kept_seed"] in ("uniform", "owl")
    assert r.fitness == pytest.approx(min(r.seed_fitness.values()))
    assert sum(r.kept) == total_keep(r.numels, 0.6)
