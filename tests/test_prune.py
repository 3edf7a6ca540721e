"""End-to-end behaviour of de_plugin.prune on a real (digits) model."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import de_plugin
from conftest import same_state, state_of

FAST = {"population": 8, "generations": 3, "rounds": 2, "finetune_epochs": 2, "scan_levels": [0.5, 0.8, 0.95]}


def zeros_agree_with_masks(result):
    params = dict(result.model.named_parameters())
    for name, mask in result.masks.items():
        w = params[name]
        assert torch.all(w[~mask] == 0), f"{name}: pruned weights must be exactly zero"
        assert result.layer_sparsity[name] == pytest.approx(1 - mask.sum().item() / mask.numel())


@pytest.mark.parametrize("recovery", ["none", "random", "splicing"])
def test_budget_form_exact_and_masked_zero_after_finetune(mlp, evaluate, finetune, recovery):
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.9, progress=False,
                        recovery=recovery, recovery_fraction=0.2, splice_interval=2, **FAST)
    total = sum(m.numel() for m in r.masks.values())
    assert abs(r.sparsity - 0.9) <= 0.5 / total  # exact budget up to rounding one weight
    zeros_agree_with_masks(r)
    # per-layer sparsity of the result equals what the last round recorded
    last = r.history[-1]
    np.testing.assert_allclose(last["layer_sparsity"], [r.layer_sparsity[n] for n in r.masks])
    assert r.nfev > 0 and r.accuracy is not None and r.reference_accuracy > 0.8
    assert finetune.steps > 0


def test_random_recovery_brings_weights_back(mlp, evaluate, digits):
    """During the recovery phase more weights are non-zero than the round keeps, and they train."""
    from de_plugin.demo.training import make_finetune

    inner = make_finetune(digits.x_train, digits.y_train, lr=1e-3, batch_size=64)
    seen = []

    def finetune(model, epochs):
        inner(model, epochs)
        w = model.fc1.weight  # masked view used by forward
        seen.append(int((w != 0).sum()))

    r = de_plugin.prune(mlp, "global_magnitude", finetune=finetune, sparsity=0.8, progress=False,
                        rounds=1, finetune_epochs=2, recovery="random", recovery_fraction=0.25)
    kept = int(r.masks["fc1.weight"].sum())
    pruned = r.masks["fc1.weight"].numel() - kept
    assert seen[0] >= kept + 0.9 * 0.25 * pruned  # recovered weights are non-zero after training
    assert seen[1] == kept  # the last epoch trains with the exact mask
    assert r.history[0]["recovered"] > 0
    zeros_agree_with_masks(r)


def test_random_recovery_on_a_channels_last_model_matches_the_contiguous_one():
    """Conv nets trained in channels-last layout (usual on GPUs, faster depthwise convs on CPUs) have weights
    with no flat view; recovery brings back the same weights at the same positions as for the contiguous model."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    seen = []

    def finetune(model, epochs):  # no training: both layouts must end with the very same weights
        seen.append(int(sum((m.weight != 0).sum() for m in model if isinstance(m, nn.Conv2d))))

    runs = [de_plugin.prune(model, "global_magnitude", finetune=finetune, sparsity=0.8, progress=False, rounds=1,
                            finetune_epochs=2, recovery="random", recovery_fraction=0.5, recovery_init="old")
            for model in (conv, copy.deepcopy(conv).to(memory_format=torch.channels_last))]
    assert runs[1].model[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert runs[0].history[0]["recovered"] > 0 and seen[0] > seen[1] and seen[:2] == seen[2:]  # recovered, then cut
    for name, mask in runs[0].masks.items():
        assert torch.equal(mask, runs[1].masks[name])
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)


def test_splicing_updates_masks_inside_user_loop(mlp, evaluate, finetune):
    r = de_plugin.prune(mlp, "lamp", finetune=finetune, sparsity=0.9, progress=False, rounds=1,
                        finetune_epochs=3, recovery="splicing", splice_interval=1)
    assert r.history[0]["spliced"] > 0
    zeros_agree_with_masks(r)


def test_accuracy_form_holds_constraint_on_validation(mlp, evaluate, finetune):
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, max_accuracy_drop=0.02,
                        progress=False, population=8, generations=3, rounds=3, finetune_epochs=2,
                        search_drop=0.05, scan_levels=[0.5, 0.8, 0.95])
    assert r.accuracy >= r.reference_accuracy - 0.02
    assert evaluate(r.model) == r.accuracy
    assert r.sparsity > 0.3
    accepted = [h for h in r.history if h.get("accepted")]
    assert accepted and all(h["accuracy_after_finetune"] >= r.reference_accuracy - 0.02 for h in accepted)
    zeros_agree_with_masks(r)


@pytest.mark.parametrize("extra", [{"parametrization": "std"}, {"fitness": "penalty"}, {"strategy": "currenttobest1bin"}])
def test_options_variants_run(mlp, evaluate, finetune, extra):
    goal = {"max_accuracy_drop": 0.03} if extra.get("fitness") == "penalty" else {"sparsity": 0.85}
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, progress=False, **goal,
                        **{**FAST, **extra})
    zeros_agree_with_masks(r)
    if "sparsity" in goal:
        assert r.sparsity == pytest.approx(0.85, abs=1e-3)


@pytest.mark.parametrize("strategy", ["de", "random", "evopress"])
def test_max_evals_bounds_search_cost(mlp, evaluate, strategy):
    """Every strategy stays within ``max_evals`` (the equal-evaluations comparisons rely on it), and the random
    and EvoPress-style ones, which have no stall stop, spend nearly all of it."""
    calls = {"n": 0}

    def counting(model):
        calls["n"] += 1
        return evaluate(model)

    r = de_plugin.prune(mlp, "de_layerwise", evaluate=counting, sparsity=0.8, progress=False,
                        **{**FAST, "generations": 50, "max_evals": 40, "search_strategy": strategy})
    assert r.nfev <= 40
    assert strategy == "de" or r.nfev >= 30
    assert calls["n"] == r.nfev + 1 + 2  # search + reference + one check per round


def test_time_limit_stops_search_after_initial_population(mlp, evaluate):
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, sparsity=0.8, progress=False,
                        **{**FAST, "generations": 200, "time_limit": 1e-6})
    assert all(h["de"]["nit"] == 0 for h in r.history)  # only the seeded population was scored
    assert r.sparsity == pytest.approx(0.8, abs=1e-3)


def test_same_seed_same_masks(mlp, evaluate, finetune, digits):
    from de_plugin.demo.training import make_finetune

    def run(seed):
        torch.manual_seed(123)
        ft = make_finetune(digits.x_train, digits.y_train, lr=1e-3, batch_size=64)
        return de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=ft, sparsity=0.9, seed=seed,
                               progress=False, recovery="random", **FAST)

    a, b = run(3), run(3)
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
    assert a.accuracy == b.accuracy


def test_input_model_untouched_unless_inplace(mlp, evaluate, finetune):
    before = state_of(mlp)
    r = de_plugin.prune(mlp, "lamp", finetune=finetune, sparsity=0.9, progress=False)
    assert same_state(before, state_of(mlp))
    assert r.model is not mlp
    r2 = de_plugin.prune(mlp, "lamp", sparsity=0.9, progress=False, inplace=True)
    assert r2.model is mlp and (mlp.fc1.weight == 0).float().mean() > 0.5


def test_baselines_need_no_evaluate_and_meet_budget(mlp):
    for name in ["uniform_magnitude", "global_magnitude", "lamp", "erk"]:
        r = de_plugin.prune(mlp, name, sparsity=0.75, progress=False)
        assert r.sparsity == pytest.approx(0.75, abs=1e-4) and r.accuracy is None
        zeros_agree_with_masks(r)
    r = de_plugin.prune(mlp, "uniform_magnitude", sparsity=0.75, progress=False)
    for v in r.layer_sparsity.values():
        assert v == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("name", ["de_layerwise", "lamp"])
def test_per_layer_bounds_respected(mlp, evaluate, name):
    r = de_plugin.prune(mlp, name, evaluate=evaluate, sparsity=0.6, progress=False, min_layer_sparsity=0.4,
                        max_layer_sparsity=0.8, **(FAST if name == "de_layerwise" else {}))
    assert r.sparsity == pytest.approx(0.6, abs=1e-3)
    for v in r.layer_sparsity.values():
        assert 0.4 - 1e-3 <= v <= 0.8 + 1e-3


def test_exclude_layer_left_dense(mlp, evaluate, finetune):
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, sparsity=0.8, exclude=["out"], progress=False, **FAST)
    assert "out.weight" not in r.masks
    assert torch.equal(r.model.out.weight, mlp.out.weight)


def test_lstm_model_is_pruned(evaluate):
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            out, _ = self.lstm(x.reshape(x.shape[0], 8, 8))
            return self.fc(out[:, -1])

    torch.manual_seed(0)
    m = Seq()
    r = de_plugin.prune(m, "de_layerwise", evaluate=evaluate, sparsity=0.7, progress=False, **FAST)
    assert set(r.masks) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "fc.weight"}
    zeros_agree_with_masks(r)


def test_save_and_load_roundtrip(mlp, tmp_path):
    r = de_plugin.prune(mlp, "global_magnitude", sparsity=0.9, progress=False)
    path = tmp_path / "masks.pt"
    r.save(path)
    fresh = de_plugin.load(path, mlp)
    for name, m in r.masks.items():
        assert torch.all(dict(fresh.named_parameters())[name][~m] == 0)
    data = r.to_json()
    assert '"sparsity"' in data and '"layer_sparsity"' in data
    other = nn.Sequential(nn.Linear(3, 3))
    before = state_of(other)
    with pytest.raises(ValueError, match="do not fit"):
        de_plugin.load(path, other)
    assert same_state(before, state_of(other))


# ---------------------------------------------------------------------------- bad input
def nan_eval(model):
    return float("nan")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"name": "de_layerwse", "sparsity": 0.5}, ValueError, "Did you mean 'de_layerwise'.*Available pruners"),
        ({"sparsity": 0.5, "max_accuracy_drop": 0.01}, ValueError, "exactly one"),
        ({}, ValueError, "exactly one"),
        ({"sparsity": 1.0}, ValueError, r"\[0, 1\)"),
        ({"sparsity": -0.1}, ValueError, r"\[0, 1\)"),
        ({"sparsity": "90%"}, TypeError, "number"),
        ({"max_accuracy_drop": 1.5}, ValueError, r"\[0, 1\)"),
        ({"sparsity": 0.5, "evaluate": nan_eval}, ValueError, "finite"),
        ({"sparsity": 0.5, "evaluate": lambda m: "high"}, TypeError, "must return a number"),
        ({"sparsity": 0.5, "evaluate": 0.9}, TypeError, "callable"),
        ({"sparsity": 0.5, "evaluate": None}, ValueError, "needs `evaluate`"),
        ({"sparsity": 0.5, "populaton": 10}, ValueError, "unknown option 'populaton'.*did you mean 'population'"),
        ({"sparsity": 0.5, "population": "many"}, ValueError, "option 'population'"),
        ({"sparsity": 0.5, "recovery": "magic"}, ValueError, "option 'recovery'"),
        ({"sparsity": 0.5, "exclude": ["classifier"]}, ValueError, "matches no module"),
        ({"sparsity": 0.5, "finetune": "train"}, TypeError, "finetune"),
    ],
)
def test_bad_input_clear_error_model_untouched(mlp, evaluate, kwargs, exc, match):
    before = state_of(mlp)
    kwargs = {"name": "de_layerwise", "evaluate": evaluate, **kwargs}
    with pytest.raises(exc, match=match):
        de_plugin.prune(mlp, progress=False, **kwargs)
    assert same_state(before, state_of(mlp))


def test_inplace_failure_restores_model(mlp, evaluate):
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] > 12:
            raise RuntimeError("evaluation server went away")
        return evaluate(model)

    before = state_of(mlp)
    with pytest.raises(RuntimeError, match="went away"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=flaky, sparsity=0.9, inplace=True, progress=False, **FAST)
    assert same_state(before, state_of(mlp))


def test_baseline_accuracy_form(mlp, evaluate, finetune):
    r = de_plugin.prune(mlp, "lamp", evaluate=evaluate, finetune=finetune, max_accuracy_drop=0.01, rounds=3,
                        finetune_epochs=1, progress=False)
    assert r.accuracy >= r.reference_accuracy - 0.01 and r.sparsity > 0.3
    zeros_agree_with_masks(r)


def test_lower_sparsity_than_model_has_is_an_error(mlp):
    r = de_plugin.prune(mlp, "lamp", sparsity=0.9, progress=False)
    with pytest.raises(ValueError, match="already 0.9"):
        de_plugin.prune(r.model, "lamp", sparsity=0.5, progress=False)


def test_no_prunable_layer_error():
    m = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="no prunable layer"):
        de_plugin.prune(m, "lamp", sparsity=0.5)


def test_nan_during_search_raises_and_input_untouched(mlp, evaluate):
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        return evaluate(model) if calls["n"] < 3 else math.nan

    before = state_of(mlp)
    with pytest.raises(ValueError, match="finite"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=flaky, sparsity=0.5, progress=False, **FAST)
    assert same_state(before, state_of(mlp))


def test_list_and_create_pruners():
    names = de_plugin.list_pruners()
    assert {"de_layerwise", "uniform_magnitude", "global_magnitude", "lamp", "erk"} <= set(names)
    assert de_plugin.list_pruners("*magnitude") == ["global_magnitude", "uniform_magnitude"]
    p = de_plugin.create_pruner("de_layerwise", population=12)
    assert p.options.population == 12


def test_val_data_instead_of_evaluate(mlp, digits):
    batches = [(digits.x_val[i : i + 100], digits.y_val[i : i + 100]) for i in range(0, 300, 100)]
    r = de_plugin.prune(mlp, "de_layerwise", val_data=batches, sparsity=0.8, progress=False, **FAST)
    assert 0.0 < r.accuracy <= 1.0 and r.sparsity == pytest.approx(0.8, abs=1e-3)


def test_accuracy_form_uses_the_allowed_drop(mlp, evaluate, finetune):
    """With rounds unset the accuracy form goes on until a sparser step breaks the limit `patience` times
    in a row, instead of stopping after a fixed number of rounds with most of the drop unused."""
    ref = evaluate(mlp)
    r = de_plugin.prune(copy.deepcopy(mlp), "de_layerwise", evaluate=evaluate, finetune=finetune,
                        max_accuracy_drop=0.02, seed=0, progress=False)
    acc = evaluate(r.model)
    assert ref - 0.02 - 1e-9 <= acc <= ref - 0.01, (ref, acc)  # within the drop, and most of it used
    assert [h["accepted"] for h in r.history[-2:]] == [False, False]  # stopped on `patience` rejections
    fixed = de_plugin.prune(copy.deepcopy(mlp), "de_layerwise", evaluate=evaluate, finetune=finetune,
                            max_accuracy_drop=0.02, seed=0, progress=False, rounds=3)
    assert r.sparsity > fixed.sparsity + 0.05, (r.sparsity, fixed.sparsity)


def test_selection_cannot_lose_to_the_seeds_on_held_out_data(mlp, digits, finetune):
    """The search scores the first 100 validation images, whose labels are shuffled (a fitness that
    misleads on purpose); the selection scores the search's best and every seed allocation on the 200
    images the search never saw: the chosen allocation is the best there, so no seed beats it."""
    g = torch.Generator().manual_seed(0)
    x, y = digits.x_val, digits.y_val.clone()
    y[:100] = y[:100][torch.randperm(100, generator=g)]  # the search's images: wrong labels
    val = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 300, 50)]
    r = de_plugin.prune(mlp, "de_layerwise", val_data=val, metric="accuracy", finetune=finetune, sparsity=0.9,
                        rounds=2, finetune_epochs=1, search_images=100, population=8, generations=3, seed=0,
                        selection="holdout", progress=False)
    for h in r.history:
        sel = h["de"]["selection"]
        sources = {s["source"] for s in sel}
        assert {"uniform_magnitude", "global_magnitude", "lamp", "erk"} <= sources, sources
        chosen = [s for s in sel if s["chosen"]]
        assert len(chosen) == 1 and chosen[0]["score"] == max(s["score"] for s in sel)
        assert all(chosen[0]["score"] >= s["score"] for s in sel if s["source"] != "search")


def test_an_unknown_selection_is_refused_before_any_work(mlp, evaluate):
    with pytest.raises(ValueError, match="selection"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, sparsity=0.5, selection="finetuned", progress=False)


@pytest.mark.parametrize("strategy", ["de", "random", "evopress"])
def test_search_strategies_keep_the_budget_exactly_at_equal_evaluations(mlp, evaluate, strategy):
    r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, sparsity=0.85, rounds=2, finetune_epochs=0,
                        population=8, generations=3, sensitivity_scan=False, search_strategy=strategy, seed=0,
                        progress=False)
    kept = sum(int(m.sum()) for m in r.masks.values())
    total = sum(m.numel() for m in r.masks.values())
    assert kept == round(total * 0.15)  # the budget, exactly
    for h in r.history:  # at most DE's evaluations: the initial population and 3 generations of 8
        assert h["de"]["nfev"] <= 8 * 4
        assert strategy == "de" or h["de"]["search_strategy"] == strategy


def test_an_unknown_search_strategy_is_refused_before_any_work(mlp):
    calls = []
    with pytest.raises(ValueError, match="search_strategy"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=lambda m: calls.append(1) or 0.5, sparsity=0.5,
                        search_strategy="cmaes", progress=False)
    assert not calls
