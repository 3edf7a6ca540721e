"""The curvature-weighted allocation (de_plugin.lm.sensitivity): the Fisher estimate, the cost table,
the budget it meets and where it puts the weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from de_plugin.demo.lm import TinyGPT
from de_plugin.lm import LayerDatabase, collect_stats, decoder_layers
from de_plugin.lm.sensitivity import cost_table, fisher_counts, fisher_diagonal
from de_plugin.search.budget import total_keep


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = TinyGPT(vocab=8, d=8, layers=1, heads=2, context=8).eval()
    return model, torch.randint(0, 8, (2, 4))


def exact_fisher(model, layers, batch):
    """Per position, sum over every next token y of q(y) * (d -log q(y) / dW)^2, averaged over positions."""
    weights = [l.module.weight for l in layers]
    out = [torch.zeros_like(l.weight) for l in layers]
    with torch.no_grad():
        probs = F.softmax(model(batch), dim=-1)
    for b in range(batch.shape[0]):
        for t in range(batch.shape[1]):
            for y in range(probs.shape[-1]):
                loss = F.cross_entropy(model(batch)[b, t][None], torch.tensor([y]))
                for o, g, l in zip(out, torch.autograd.grad(loss, weights), layers):
                    o += probs[b, t, y] * (g.t() if l.transposed else g) ** 2
    return [o / batch.numel() for o in out]


def test_fisher_diagonal_is_an_unbiased_estimate_of_the_exact_fisher(small):
    model, batch = small
    layers = decoder_layers(model)
    exact = exact_fisher(model, layers, batch)
    draws = 400
    mean = [torch.zeros_like(e) for e in exact]
    for s in range(draws):
        for m, f in zip(mean, fisher_diagonal(model, layers, [batch], seed=s)):
            m += f / draws
    for l, e, m in zip(layers, exact, mean):
        assert float((m - e).abs().sum() / e.abs().sum()) < 0.12, l.name
    assert all(l.module.weight.grad is None for l in layers)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cost_table_is_half_the_fisher_weighted_squares_of_the_removed_weights(small, method):
    """SparseGPT's update of the weights it keeps is not counted as damage (it cancels the removal's effect)."""
    model, batch = small
    layers = decoder_layers(model)
    stats = collect_stats(model, layers, [batch], hessians=method == "sparsegpt")
    db = LayerDatabase(layers, stats, method)
    fisher = fisher_diagonal(model, layers, [batch], seed=0)
    grid = np.array([[l.numel, l.numel // 2, 0] for l in layers])
    cost = cost_table(db, fisher, grid)
    for i, l in enumerate(layers):
        w = l.weight.detach()
        assert cost[i, 0] == 0.0
        for g in (1, 2):  # SparseGPT: at its nearest level
            removed = db.weight(i, int(grid[i, g])) == 0
            assert removed.sum() >= l.numel // 3
            assert cost[i, g] == pytest.approx(0.5 * float((fisher[i] * w * w)[removed].sum()), rel=1e-5)


def allocation(model, batch, fisher, sparsity=0.6):
    layers = decoder_layers(model)
    db = LayerDatabase(layers, collect_stats(model, layers, [batch]), "magnitude")
    numels = np.array([l.numel for l in layers])
    lo, hi = np.floor(numels * 0.1).astype(np.int64), numels.copy()
    return fisher_counts(db, fisher, numels, total_keep(numels, sparsity), lo, hi), numels, lo, hi


def test_fisher_counts_meet_the_exact_budget_within_bounds(small):
    model, batch = small
    fisher = fisher_diagonal(model, decoder_layers(model), [batch], seed=0)
    counts, numels, lo, hi = allocation(model, batch, fisher)
    assert counts.sum() == total_keep(numels, 0.6)
    assert np.all(counts >= lo) and np.all(counts <= hi)


def test_a_layer_the_output_is_more_sensitive_to_keeps_more(small):
    model, batch = small
    fisher = fisher_diagonal(model, decoder_layers(model), [batch], seed=0)
    before, *_ = allocation(model, batch, fisher)
    fisher[4] = fisher[4] * 1000.0  # up_proj: a thousand times as costly to change
    after, numels, *_ = allocation(model, batch, fisher)
    assert after[4] > before[4]
    assert after[4] / numels[4] > np.delete(after / numels, 4).max() - 1e-9
