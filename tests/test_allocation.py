import numpy as np
import pytest
import torch

from de_plugin.search.budget import fit_budget
from de_plugin.weights import allocation


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(300, 100, generator=g), torch.randn(100, 50, generator=g) * 0.1, torch.randn(10, 50, generator=g) * 3]


@pytest.mark.parametrize("rule", list(allocation.ALLOCATIONS))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.987])
def test_counts_sum_exactly_to_budget(rule, sparsity, weights):
    counts = allocation.ALLOCATIONS[rule](weights, sparsity)
    n = [w.numel() for w in weights]
    assert counts.sum() == round(sum(n) * (1 - sparsity))
    assert np.all(counts >= 0) and np.all(counts <= n)


def test_uniform_is_uniform(weights):
    counts = allocation.uniform(weights, 0.8)
    np.testing.assert_allclose(counts / [w.numel() for w in weights], 0.2, atol=1e-3)


def test_global_magnitude_is_one_threshold(weights):
    counts = allocation.global_magnitude(weights, 0.9)
    masks = allocation.masks_from_counts(weights, counts)
    kept = torch.cat([w[m].abs() for w, m in zip(weights, masks)])
    pruned = torch.cat([w[~m].abs() for w, m in zip(weights, masks)])
    assert kept.min() >= pruned.max()


def test_lamp_scores_hand_example():
    w = torch.tensor([1.0, -2.0, 3.0])
    # sorted squares 1, 4, 9: scores 1/14, 4/13, 9/9
    torch.testing.assert_close(allocation.lamp_scores(w), torch.tensor([1 / 14, 4 / 13, 1.0]))


def test_erk_density_proportional_to_rule(weights):
    counts = allocation.erk(weights, 0.9)
    dens = counts / np.array([w.numel() for w in weights])
    raw = np.array([sum(w.shape) / w.numel() for w in weights])
    ratio = dens / raw
    unclipped = dens < 1
    np.testing.assert_allclose(ratio[unclipped], ratio[unclipped][0], rtol=0.02)


def test_fit_budget_keeps_shape_and_total():
    n = np.array([1000, 500, 100])
    counts = fit_budget(np.array([0.2, 0.4, 0.8]), n, 300, np.array([1, 1, 1]))
    assert counts.sum() == 300
    d = counts / n
    assert d[0] < d[1] < d[2]


def test_fit_budget_impossible_raises():
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        fit_budget(np.array([0.5, 0.5]), np.array([10, 10]), 5, np.array([5, 5]))


def test_masks_from_counts_keep_largest():
    w = torch.tensor([[0.1, -5.0], [2.0, 0.3]])
    (m,) = allocation.masks_from_counts([w], [2])
    assert m.tolist() == [[False, True], [True, False]]
