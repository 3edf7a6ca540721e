"""``selection_lookahead``: each finalist of a round before the last also scored one round further (its retrained
weights pruned on to the next round's keep, no training), and chosen by the sum with its short-fine-tune score."""
import numpy as np
import pytest
import torch

import de_plugin
from conftest import same_state, state_of
from de_plugin.targets import find_targets, get_param
from de_plugin.weights.lookahead import next_keep, next_round_score
from de_plugin.weights.rounds import density_schedule


def test_next_keep_follows_the_runners_geometric_schedule():
    total, rounds = 100_000, 4
    plan = density_schedule(1.0, 0.05, rounds)
    keeps = [int(round(total * d)) for d in plan[:-1]] + [5_000]
    for i in range(rounds - 1):
        assert abs(next_keep(keeps[i], 5_000, rounds - i - 1) - keeps[i + 1]) <= 1
    assert next_keep(keeps[-1], 5_000, 0) is None  # after the last round: nothing to look at
    assert next_keep(5_000, 5_000, 2) is None


def test_next_round_score_prunes_to_the_next_keep_within_each_layer_and_restores_the_weights(mlp, evaluate):
    targets = find_targets(mlp)
    numels = np.array([t.numel for t in targets])
    counts = (numels * np.array([0.5, 0.2, 0.9])[:len(numels)]).astype(np.int64)
    with torch.no_grad():  # the finalist as retrained: pruned to counts by magnitude
        for t, k in zip(targets, counts):
            w = get_param(mlp, t)
            w.mul_(w.abs().reshape(-1).argsort(descending=True).argsort().reshape(w.shape) < k)
    before, seen = state_of(mlp), []

    def score():
        kept = [int(torch.count_nonzero(get_param(mlp, t))) for t in targets]
        seen.append(kept)
        return evaluate(mlp)

    keep = int(counts.sum()) // 2
    min_keep = np.ones_like(counts)
    min_keep[1] = int(numels[1] * 0.3)  # above the second layer's count: a bound that layer is already past
    got = next_round_score(mlp, targets, counts, keep, min_keep, score)
    assert len(seen) == 2  # the finalist's own shape scaled, and LAMP
    for kept in seen:
        assert sum(kept) == keep and all(k <= c for k, c in zip(kept, counts))  # a layer never grows back
    assert seen[0] != seen[1]
    assert same_state(before, state_of(mlp))
    assert got == pytest.approx(max(evaluate_at(mlp, targets, kept, evaluate) for kept in seen))


def evaluate_at(model, targets, kept, evaluate):
    """The model pruned by magnitude to ``kept`` per layer, scored, weights put back."""
    saved = state_of(model)
    with torch.no_grad():
        for t, k in zip(targets, kept):
            w = get_param(model, t)
            w.mul_(w.abs().reshape(-1).argsort(descending=True, stable=True).argsort().reshape(w.shape) < k)
    try:
        return evaluate(model)
    finally:
        model.load_state_dict(saved)


def test_lookahead_scores_every_finalist_before_the_last_round_and_chooses_by_the_sum(mlp, evaluate, finetune):
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.95, rounds=3,
                        finetune_epochs=1, population=8, generations=2, seed=0, finalists=3, recovery="none",
                        selection_lookahead=True, progress=False)
    for i, h in enumerate(r.history):
        retrained = [s for s in h["de"]["selection"] if "score_after_short_finetune" in s]
        assert len(retrained) >= 3
        ahead = [s for s in retrained if "score_one_round_ahead" in s]
        if i == len(r.history) - 1:
            assert not ahead  # the last round has no next one
            continue
        assert ahead == retrained
        chosen = next(s for s in retrained if s["chosen"])
        by = "score" if h["de"]["selection_fallback_used"] else "score_after_short_finetune"
        total = max(s[by] + s["score_one_round_ahead"] for s in retrained)
        assert chosen[by] + chosen["score_one_round_ahead"] == total
    kept = sum(int(m.sum()) for m in r.masks.values())
    assert kept == round(sum(m.numel() for m in r.masks.values()) * 0.05)


def test_lookahead_without_finalists_is_refused_before_any_work(mlp):
    before, calls = state_of(mlp), []
    with pytest.raises(ValueError, match="selection_lookahead=True.*selection='holdout'"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=lambda m: calls.append(1) or 0.5, sparsity=0.5, inplace=True,
                        selection="holdout", selection_lookahead=True, progress=False)
    assert not calls and same_state(before, state_of(mlp))
