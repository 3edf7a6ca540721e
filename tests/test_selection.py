"""Choosing a round's allocation among finalists: the short fine-tune measure shared by de_layerwise and
de_channel (de_plugin.search.selection), its cost record, and the bad input it refuses before any work."""
import pytest
import torch

import de_plugin
from conftest import same_state, state_of

SEEDS = {"uniform_magnitude", "global_magnitude", "lamp", "erk"}


def _misleading_val(digits):
    """Validation batches whose first 100 images (what the search scores) carry shuffled labels."""
    g = torch.Generator().manual_seed(0)
    x, y = digits.x_val, digits.y_val.clone()
    y[:100] = y[:100][torch.randperm(100, generator=g)]
    return [(x[i:i + 50], y[i:i + 50]) for i in range(0, 300, 50)]


def test_finetune_selection_retrains_the_finalists_from_the_round_weights_and_cannot_lose_to_the_best_seed(
        mlp, digits, finetune):
    """The search's best and every seed are scored on the images the search did not see (the search's own
    images carry shuffled labels: a fitness that misleads on purpose); the `finalists` best of them (here 1: the
    search's) and the best seed are each retrained once for finalist_epochs from the round's weights (the
    biases, which no mask touches, are the same at every start) and scored again; the best wins, so the
    best seed cannot beat the choice on that measure. The cost is recorded."""
    starts = []

    def recording(model, epochs):
        starts.append((epochs, model.fc1.bias.detach().clone()))
        finetune(model, epochs)

    r = de_plugin.prune(mlp, "de_layerwise", val_data=_misleading_val(digits), finetune=recording, sparsity=0.9,
                        rounds=1, finetune_epochs=2, search_images=100, population=8, generations=2, seed=0,
                        finalists=1, recovery="none", progress=False)  # selection: 'finetune' (finetune given)
    de = r.history[0]["de"]
    sel = de["selection"]
    assert SEEDS <= {s["source"] for s in sel}
    retrained = [s for s in sel if "score_after_short_finetune" in s]
    assert len(retrained) == 2  # the best by the held-out score (the search's), and the best seed
    best_seed = max((s for s in sel if s["source"] != "search"), key=lambda s: s["score"])
    assert "score_after_short_finetune" in best_seed
    chosen = [s for s in sel if s["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["score_after_short_finetune"] == max(s["score_after_short_finetune"] for s in retrained)
    assert de["finalists_retrained"] == 2 and de["finalist_epochs_total"] == 2 and de["selection_seconds"] > 0
    assert [e for e, _ in starts] == [1, 1, 2]  # one short retraining per finalist, then the round's
    for _, b in starts:
        assert torch.equal(b, starts[0][1])  # restored after every finalist (and for the round's fine-tune)
    kept = sum(int(m.sum()) for m in r.masks.values())
    assert kept == round(sum(m.numel() for m in r.masks.values()) * 0.1)


def test_without_finetune_the_selection_is_holdout(mlp, digits, evaluate):
    r = de_plugin.prune(mlp, "de_layerwise", val_data=_misleading_val(digits), sparsity=0.9, rounds=1,
                        search_images=100, population=8, generations=2, seed=0, progress=False)
    sel = r.history[0]["de"]["selection"]
    assert SEEDS <= {s["source"] for s in sel} and not any("score_after_short_finetune" in s for s in sel)
    assert "finalists_retrained" not in r.history[0]["de"]


@pytest.mark.parametrize("kw,match", [
    ({"selection": "finetune"}, "selection='finetune'.*finetune"),
    ({"rescore_top": 9, "population": 8}, "rescore_top=9.*population"),
    ({"finalists": 9, "population": 8}, "finalists=9.*population"),
])
def test_layerwise_selection_bad_input_is_refused_before_any_work(mlp, kw, match):
    before, calls = state_of(mlp), []
    with pytest.raises(ValueError, match=match):
        de_plugin.prune(mlp, "de_layerwise", evaluate=lambda m: calls.append(1) or 0.5, sparsity=0.5, inplace=True,
                        progress=False, **kw)
    assert not calls and same_state(before, state_of(mlp))


def test_finetune_selection_needs_the_budget_form(mlp, evaluate, finetune):
    with pytest.raises(ValueError, match="budget-form"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, max_accuracy_drop=0.01,
                        selection="finetune", progress=False)


def test_finalist_seeds_retrains_the_best_seeds_too(mlp, digits, finetune):
    """finalist_seeds=3: the three best seeds by the held-out score are retrained besides the search's finalist,
    so a heuristic ranked below another before fine-tuning can still be chosen after it."""
    r = de_plugin.prune(mlp, "de_layerwise", val_data=_misleading_val(digits), finetune=finetune, sparsity=0.9,
                        rounds=1, finetune_epochs=1, search_images=100, population=8, generations=2, seed=0,
                        finalists=1, finalist_seeds=3, recovery="none", progress=False)
    de = r.history[0]["de"]
    seeds = sorted((s for s in de["selection"] if s["source"] != "search"), key=lambda s: -s["score"])
    assert all("score_after_short_finetune" in s for s in seeds[:3])
    assert all("score_after_short_finetune" not in s for s in seeds[3:])
    retrained = [s for s in de["selection"] if "score_after_short_finetune" in s]
    assert de["finalists_retrained"] == len(retrained) == 4  # the search's best and three seeds
    chosen = next(s for s in de["selection"] if s["chosen"])
    assert chosen["score_after_short_finetune"] == max(s["score_after_short_finetune"] for s in retrained)


def test_choose_keeps_the_best_seed_unless_the_search_beats_it_by_the_margin():
    from de_plugin.search.selection import choose
    scores = {(1,): 0.903, (2,): 0.900, (3,): 0.899}  # (1,) the search's, (2,) and (3,) seeds
    seeds = {(2,), (3,)}
    assert choose(scores, seeds) == (1,)  # margin 0: the plain best
    assert choose(scores, seeds, 0.002) == (1,)  # ahead by 0.003 > 0.002
    assert choose(scores, seeds, 0.005) == (2,)  # not ahead by more than 0.005: the best seed
    assert choose({(1,): 0.5, (2,): 0.6}, {(2,)}, 0.005) == (2,)  # a seed that is best wins anyway
    assert choose({(1,): 0.9}, set(), 0.5) == (1,)  # no seed among the finalists: the best


def test_selection_margin_returns_the_best_retrained_seed_when_no_search_allocation_clears_it(mlp, digits, finetune):
    """selection_margin=1 (no score can clear it): the chosen allocation is the best seed after the short
    fine-tune, never the search's, even where the search's scored higher."""
    r = de_plugin.prune(mlp, "de_layerwise", val_data=_misleading_val(digits), finetune=finetune, sparsity=0.9,
                        rounds=1, finetune_epochs=1, search_images=100, population=8, generations=2, seed=0,
                        finalists=2, finalist_seeds=2, selection_margin=1.0, recovery="none", progress=False)
    sel = r.history[0]["de"]["selection"]
    retrained = [s for s in sel if "score_after_short_finetune" in s]
    chosen = next(s for s in sel if s["chosen"])
    assert chosen["source"] != "search"
    assert chosen["score_after_short_finetune"] == max(s["score_after_short_finetune"] for s in retrained
                                                      if s["source"] != "search")


def _counting(finetune):
    """``finetune`` that records, per call, the optimiser steps it took (train-mode forwards of the model)."""
    def run(model, epochs):
        before = finetune.steps
        try:
            finetune(model, epochs)
        finally:
            run.calls.append((epochs, finetune.steps - before))
    run.calls = []
    return run


def test_capped_finetune_stops_after_the_asked_training_batches_even_through_except_exception():
    """``capped`` lets exactly `steps` train-mode forwards through (eval-mode forwards are not counted), a loop
    that catches Exception around each step cannot swallow the stop, and the hook is gone afterwards."""
    from de_plugin.search.selection import capped
    model = torch.nn.Linear(4, 2)
    done, tried = [], []

    def loop(m, epochs):
        for _ in range(epochs * 10):
            tried.append(1)
            m.eval()
            m(torch.zeros(1, 4))  # a validation forward inside the loop: not a training batch
            m.train()
            try:
                m(torch.zeros(1, 4)).sum().backward()
            except Exception:  # a defensive loop: must not swallow the stop
                continue
            done.append(1)

    short = capped(loop, 3)
    short(model, 2)
    assert len(done) == 3 and short.taken == 3
    assert len(tried) == 4  # the loop ends at the refused batch: it does not go on through both epochs
    assert not model._forward_pre_hooks
    done.clear()
    capped(loop, None)(model, 1)
    assert len(done) == 10


def test_finalist_steps_caps_each_finalists_retraining_and_not_the_rounds_fine_tune(mlp, digits, finetune):
    run = _counting(finetune)
    r = de_plugin.prune(mlp, "de_layerwise", val_data=_misleading_val(digits), finetune=run, sparsity=0.9,
                        rounds=1, finetune_epochs=1, search_images=100, population=8, generations=2, seed=0,
                        finalists=1, finalist_steps=5, recovery="none", progress=False)
    epoch = -(-len(digits.y_train) // 64)
    assert run.calls == [(1, 5), (1, 5), (1, epoch)]  # two finalists capped, the round's whole epoch
    de = r.history[0]["de"]
    assert de["finalists_retrained"] == 2 and de["finalist_steps_total"] == 10


def test_de_channel_finalist_steps_caps_each_finalists_retraining(resnet, images):
    from de_plugin.demo.training import make_finetune
    ft = _counting(make_finetune(images.x, images.y, lr=1e-3, batch_size=64))
    r = de_plugin.prune(resnet, "de_channel", val_data=images.val, train_data=images.batches, finetune=ft, macs=0.6,
                        rounds=1, finalists=2, finalist_steps=2, finetune_epochs=1, population=6, generations=1,
                        bn_batches=2, seed=0, progress=False)
    fin = r.history[0]["de"]["finalists"]
    assert ft.calls == [(1, 2)] * len(fin) + [(1, len(images.batches))]
    assert r.history[0]["de"]["finalist_steps_total"] == 2 * len(fin)


@pytest.mark.parametrize("name,kw,match", [
    ("de_layerwise", {"selection": "holdout", "finalist_steps": 5}, "finalist_steps=5.*selection='finetune'"),
    ("de_channel", {"macs": 0.5, "finalist_steps": 5}, "finalist_steps=5.*finalists"),
])
def test_finalist_steps_without_finalists_is_refused_before_any_work(mlp, name, kw, match):
    before, calls = state_of(mlp), []
    with pytest.raises(ValueError, match=match):
        de_plugin.prune(mlp, name, evaluate=lambda m: calls.append(1) or 0.5, sparsity=0.5 if "macs" not in kw
                        else None, inplace=True, progress=False, **kw)
    assert not calls and same_state(before, state_of(mlp))


def test_choose_falls_back_to_the_scores_before_a_short_finetune_that_lowered_every_finalist():
    """A short fine-tune that raised none of the finalists has not recovered them: its ranking is noise, so the
    choice is the best before it; one finalist raised is enough to trust the scores after it."""
    from de_plugin.search.selection import choose, uninformative
    before = {(1,): 0.31, (2,): 0.29, (3,): 0.30}  # (3,) a seed
    after = {(1,): 0.15, (2,): 0.21, (3,): 0.16}
    assert uninformative(after, before) and choose(after, {(3,)}, before=before) == (1,)
    assert choose(after, {(3,)}) == (2,)  # without `before`: the plain best after
    raised = {**after, (3,): 0.35}
    assert not uninformative(raised, before) and choose(raised, {(3,)}, before=before) == (3,)
    assert uninformative({(1,): 0.9}, {(1,): 0.9})  # level counts as not raised
    assert not uninformative({}, {})


def _spoiling(finetune):
    """``finetune`` that trains, then adds noise to every weight during the finalists' one-epoch retrainings
    (the round's own two-epoch fine-tune is left alone): every finalist ends below its score before it."""
    def run(model, epochs):
        finetune(model, epochs)
        if epochs == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * p.std() * 3)
    return run


@pytest.mark.parametrize("fallback", [True, False])
def test_selection_falls_back_when_the_short_finetune_lowers_every_finalist(mlp, digits, finetune, fallback):
    """With a retraining that spoils every finalist the choice is the best by the held-out score before it
    (recorded as selection_fallback_used); with selection_fallback=False, the best after it."""
    r = de_plugin.prune(mlp, "de_layerwise", val_data=_misleading_val(digits), finetune=_spoiling(finetune),
                        sparsity=0.9, rounds=1, finetune_epochs=2, search_images=100, population=8, generations=2,
                        seed=0, finalists=3, finalist_seeds=2, recovery="none", selection_fallback=fallback,
                        progress=False)
    de = r.history[0]["de"]
    retrained = [s for s in de["selection"] if "score_after_short_finetune" in s]
    assert len(retrained) >= 3 and all(s["score_after_short_finetune"] < s["score"] for s in retrained)
    chosen = next(s for s in de["selection"] if s["chosen"])
    key = "score" if fallback else "score_after_short_finetune"
    assert chosen[key] == max(s[key] for s in retrained)
    assert de["selection_fallback_used"] is fallback


@pytest.mark.parametrize("fallback", [True, False])
def test_de_channel_finalists_fall_back_when_the_retraining_lowers_every_one(resnet, images, fallback):
    """de_channel's finalists go through the same choice: a retraining that spoils them all is not trusted, the
    best by the search's own score wins (recorded); with selection_fallback=False, the best after it."""
    from de_plugin.demo.training import make_finetune
    r = de_plugin.prune(resnet, "de_channel", val_data=images.val, train_data=images.batches, macs=0.6, rounds=1,
                        finetune=_spoiling(make_finetune(images.x, images.y, lr=1e-3, batch_size=64)),
                        finalists=3, finetune_epochs=2, population=6, generations=1, bn_batches=2, seed=0,
                        selection_fallback=fallback, progress=False)
    de = r.history[0]["de"]
    fin = de["finalists"]
    assert len(fin) >= 3 and all(f["score_after_short_finetune"] < f["search_score"] for f in fin)
    assert de["selection_fallback_used"] is fallback
    key = "search_score" if fallback else "score_after_short_finetune"
    best = max(fin, key=lambda f: f[key])
    assert r.history[0]["q"] == best["q"] and [f[key] for f in fin].count(best[key]) == 1
    other = "score_after_short_finetune" if fallback else "search_score"
    assert max(fin, key=lambda f: f[other])["q"] != best["q"]  # the two measures pick different shapes


def _bn_only_retraining(model, epochs):
    """A "retraining" that changes no weight and leaves BatchNorm running statistics far from the data's, as the
    statistics a few momentum updates on augmented batches leave behind do."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(3.0)
                m.running_var.mul_(30.0)


def _finalist_scores(pruner, model, images, reestimate):
    """(score after the short retraining, score before it) of every retrained finalist of one round."""
    kw = ({"sparsity": 0.8, "recovery": "none"} if pruner == "de_layerwise" else {"macs": 0.5})
    r = de_plugin.prune(model, pruner, val_data=images.val, train_data=images.batches, finetune=_bn_only_retraining,
                        rounds=1, finetune_epochs=1, population=8, generations=1, seed=0, finalists=2,
                        finalist_adaptive_bn=reestimate, progress=False, **kw)
    de = r.history[0]["de"]
    if pruner == "de_layerwise":
        return [(s["score_after_short_finetune"], s["score"]) for s in de["selection"] if "score_after_short_finetune" in s]
    return [(f["score_after_short_finetune"], f["search_score"]) for f in de["finalists"]]


@pytest.mark.parametrize("reestimate", [True, False])
@pytest.mark.parametrize("pruner", ["de_layerwise", "de_channel"])
def test_finalists_are_scored_with_the_batchnorm_statistics_the_search_used(resnet, images, pruner, reestimate):
    """With adaptive BN (BatchNorm + train_data), a finalist's score after the short retraining re-estimates the
    statistics on the search's batches first (both pruners: the shared RetrainedMeasure): a retraining that changes
    no weight leaves every score as it was before it. finalist_adaptive_bn=False scores on the statistics the
    retraining left (here: near chance)."""
    scores = _finalist_scores(pruner, resnet, images, reestimate)
    assert len(scores) >= 2
    for after, before in scores:
        if reestimate:
            assert after == pytest.approx(before, abs=1e-6)
        else:
            assert after < before - 0.2
