"""Choosing a round's allocation among finalists: the short fine-tune measure shared by de_layerwise and
de_channel (de_plugin.selection), its cost record, and the bad input it refuses before any work."""
import copy

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


def test_finetune_selection_retrains_every_finalist_from_the_round_weights_and_picks_the_best(mlp, digits, finetune):
    """Each finalist (the search's best and every seed) is retrained once for finalist_epochs from the round's
    weights (the biases, which no mask touches, are the same at every finalist's start), scored on the images
    the search did not see; the best wins, so no seed beats the choice on that measure; the cost is recorded."""
    starts = []

    def recording(model, epochs):
        starts.append((epochs, model.fc1.bias.detach().clone()))
        finetune(model, epochs)

    r = de_plugin.prune(mlp, "de_layerwise", val_data=_misleading_val(digits), finetune=recording, sparsity=0.9,
                        rounds=1, finetune_epochs=2, search_images=100, population=8, generations=2, seed=0,
                        selection="finetune", finalist_epochs=1, recovery="none", progress=False)
    de = r.history[0]["de"]
    sel = de["selection"]
    assert SEEDS <= {s["source"] for s in sel}
    chosen = [s for s in sel if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["score"] == max(s["score"] for s in sel)
    assert de["finalists_retrained"] == len(sel) and de["finalist_epochs_total"] == len(sel)
    assert de["selection_seconds"] > 0
    assert [e for e, _ in starts] == [1] * len(sel) + [2]  # one short retraining per finalist, then the round's
    for _, b in starts:
        assert torch.equal(b, starts[0][1])  # restored after every finalist (and for the round's fine-tune)
    kept = sum(int(m.sum()) for m in r.masks.values())
    assert kept == round(sum(m.numel() for m in r.masks.values()) * 0.1)


@pytest.mark.parametrize("kw,match", [
    ({"selection": "finetune"}, "selection='finetune'.*finetune"),
    ({"rescore_top": 9, "population": 8}, "rescore_top=9.*population"),
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
