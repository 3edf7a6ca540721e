"""The round runner driven one step at a time, as a framework's schedule or a user's loop does."""
import copy

import pytest
import torch

import de_plugin
from de_plugin.adapter import Context, RoundRunner, create_pruner
from de_plugin.targets import find_targets

FAST = {"population": 6, "generations": 2, "rounds": 3, "finetune_epochs": 1, "scan_levels": [0.5, 0.8]}


def context(model, evaluate, finetune, **goal):
    return Context(model=model, targets=find_targets(model), evaluate=evaluate, finetune=finetune, seed=0,
                   progress=False, **{"sparsity": None, "max_accuracy_drop": None, **goal})


def test_stepping_by_hand_equals_prune(mlp, evaluate, finetune):
    torch.manual_seed(0)
    whole = de_plugin.prune(copy.deepcopy(mlp), "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.9,
                            progress=False, **FAST)
    torch.manual_seed(0)
    runner = RoundRunner(create_pruner("de_layerwise", **FAST))
    runner.start(context(mlp, evaluate, finetune, sparsity=0.9))
    sparsities = []
    while not runner.done:
        sparsities.append(runner.step()["sparsity"])
    out = runner.finish()
    assert sparsities == sorted(sparsities) and len(sparsities) == 3  # the geometric plan, one round per step
    assert sparsities[-1] == pytest.approx(0.9, abs=1e-3)
    assert out.masks.keys() == whole.masks.keys()
    assert all(torch.equal(out.masks[k], whole.masks[k]) for k in out.masks)
    assert out.nfev == whole.nfev and out.history[-1]["sparsity"] == whole.history[-1]["sparsity"]
    with pytest.raises(RuntimeError, match="finished"):
        runner.step()


def test_state_dict_round_trip_continues_identically(mlp, evaluate, finetune):
    """Stop after one round, rebuild everything from state_dict(), finish: the masks of a straight run."""
    def start(model):
        r = RoundRunner(create_pruner("uniform_magnitude", rounds=3, finetune_epochs=1, recovery="random"))
        r.start(context(model, evaluate, finetune, sparsity=0.8))
        return r

    torch.manual_seed(0)
    straight = start(copy.deepcopy(mlp))
    while not straight.done:
        straight.step()
    expected = straight.finish()

    torch.manual_seed(0)
    first = start(copy.deepcopy(mlp))
    first.step()
    saved = first.state_dict()
    torch.manual_seed(1)  # the finetune's own seed is set per round from the run's seed
    second = start(copy.deepcopy(mlp))
    second.load_state_dict(saved)
    while not second.done:
        second.step()
    got = second.finish()
    assert [h["round"] for h in got.history] == [0, 1, 2]
    assert all(torch.equal(got.masks[k], expected.masks[k]) for k in expected.masks)


def test_scheduled_mode_takes_the_callers_sparsity(mlp, evaluate):
    runner = RoundRunner(create_pruner("de_layerwise", **FAST))
    runner.start(context(mlp, evaluate, None))  # no goal: the caller's schedule decides
    assert not runner.done
    with pytest.raises(ValueError, match="target_sparsity"):
        runner.step()
    for s in (0.3, 0.6):
        rec = runner.step(target_sparsity=s)
        assert rec["sparsity"] == pytest.approx(s, abs=1e-3) and rec["accuracy_after_finetune"] is None
    kept = [int(m.sum()) for m in runner.masks.values()]
    weights = [mlp.fc1.weight, mlp.fc2.weight, mlp.out.weight]
    assert kept == [int((w != 0).sum()) for w in weights]  # masked weights are zero in the model
    runner.pruner.close()


def test_resume_needs_a_checkpoint():
    with pytest.raises(ValueError, match="checkpoint="):
        RoundRunner(create_pruner("de_layerwise"), resume=True)
