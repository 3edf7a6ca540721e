"""de_layerwise on bigger models: what the search holds per weight, attention weights as
targets, the per-round sort done once, and the peak memory of a search on a mid-size model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import de_plugin
from de_plugin.weights.allocation import masks_from_counts
from de_plugin.weights.magnitude import MagnitudeScorer
from de_plugin.weights.allocation import magnitude_rank
from de_plugin.weights.rounds import State
from de_plugin.targets import find_targets

ROOT = Path(__file__).resolve().parents[1]
# the peak follows what is allocated, not glibc's heap policy (benchmarks/big_models.py MEASURE_ENV)
MEASURE_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(16, 32)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def test_attention_projections_are_targets_and_pruned():
    torch.manual_seed(0)
    model, x = TinyViT(), torch.randn(64, 8, 16)
    y = torch.randint(0, 10, (64,))
    names = [t.name for t in find_targets(model)]
    assert "enc.self_attn.in_proj_weight" in names and "enc.self_attn.out_proj.weight" in names
    covered = sum(t.numel for t in find_targets(model))
    assert covered == sum(p.numel() for n, p in model.named_parameters() if p.dim() > 1)  # every matrix

    def finetune(m, epochs):
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        for _ in range(epochs):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    r = de_plugin.prune(model, "de_layerwise", val_data=[(x, y)], finetune=finetune, sparsity=0.8, progress=False,
                        population=4, generations=1, rounds=2, scan_levels=[0.5])
    assert r.sparsity == pytest.approx(0.8, abs=1e-4)
    params = dict(r.model.named_parameters())
    assert r.layer_sparsity["enc.self_attn.in_proj_weight"] > 0
    for name, mask in r.masks.items():
        assert torch.all(params[name][~mask] == 0), name
    assert r.model(x).shape == (64, 10)


def test_rank_masks_equal_sorted_masks_ties_included():
    w = torch.tensor([[0.5, -0.5, 0.1], [0.0, 0.5, -0.1]])  # ties: three 0.5s, two 0.1s
    rank = magnitude_rank(w)
    for k in range(w.numel() + 1):
        assert torch.equal(masks_from_counts([w], [k], [rank])[0], masks_from_counts([w], [k])[0]), k


def test_search_holds_eight_bytes_per_weight_and_state_no_value_copy(mlp, evaluate):
    targets = find_targets(mlp)
    n = sum(t.numel for t in targets)
    scorer = MagnitudeScorer(mlp, targets, evaluate)
    assert scorer.rank is None  # nothing built until the round starts
    scorer.reset()
    held = sum(t.numel() * t.element_size() for t in scorer.w0 + scorer.rank)
    assert held == 8 * n  # fp32 snapshot + int32 rank (was fp32 + int64 order, built twice)
    from de_plugin.pruner import Context

    ctx = Context(model=mlp, targets=targets, evaluate=evaluate, finetune=None, sparsity=0.5,
                  max_accuracy_drop=None, seed=0)
    assert State(ctx).last_values == {} and len(State(ctx, keep_values=True).last_values) == len(targets)


def test_one_sort_per_round(mlp, evaluate, finetune, monkeypatch):
    calls = []
    original = torch.argsort

    def counting(t, *a, **k):
        calls.append(t.numel())
        return original(t, *a, **k)

    monkeypatch.setattr(torch, "argsort", counting)
    n_layers = len(find_targets(mlp))
    de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.8, progress=False,
                    population=4, generations=1, rounds=2, finetune_epochs=1, sensitivity_scan=False,
                    recovery="none")  # the seeds (LAMP among them) are on by default
    assert len(calls) == 2 * n_layers  # one magnitude sort per layer and round (was four)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in kilobytes is Linux's")
def test_peak_memory_per_weight_on_a_mid_size_model():
    """A one-round search on a 5.7M-weight VGG: peak RSS beyond the model and data, per weight
    (19 bytes with ranks, measured with a fixed mmap threshold)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "big_models.py"), "--one", "vgg_cifar"],
                         capture_output=True, text=True, timeout=300, check=True, env=MEASURE_ENV)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["coverage"] == 1.0
    assert row["peak_extra_bytes_per_weight"] <= 24, row


def test_lamp_from_ranks_gives_the_sorted_counts_ties_included():
    from de_plugin.weights import allocation

    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-3, 4, (40, 30), generator=g).float() / 4,  # many exact ties and zeros
               torch.randn(50, 20, generator=g), torch.randint(-2, 3, (64,), generator=g).float()]
    ranks = [magnitude_rank(w) for w in weights]
    for sparsity in (0.1, 0.5, 0.8, 0.95):
        assert np.array_equal(allocation.lamp(weights, sparsity), allocation.lamp(weights, sparsity, ranks)), sparsity


def test_keep_mask_is_the_rank_mask_without_ranks_ties_included():
    from de_plugin.weights.allocation import keep_mask

    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-3, 4, (40, 30), generator=g).float() / 4,  # many ties and exact zeros
               torch.randn(50, 20, generator=g), torch.zeros(7, 3), torch.randn(2, 3, 3, 3, generator=g).half()]
    for w in weights:
        rank = magnitude_rank(w)
        for k in range(w.numel() + 1):
            assert torch.equal(keep_mask(w, k), rank < k), (tuple(w.shape), k)


def test_low_memory_scorer_holds_only_the_snapshot_and_takes_it_lazily(mlp, evaluate):
    targets = find_targets(mlp)
    n = sum(t.numel for t in targets)
    before = {t.name: p.detach().clone() for t, p in zip(targets, (dict(mlp.named_parameters())[t.name]
                                                                  for t in targets))}
    scorer = MagnitudeScorer(mlp, targets, evaluate, low_memory=True)
    scorer.reset()
    assert scorer.rank is None and scorer._w0 is None  # nothing per weight until the first candidate
    counts = [t.numel // 3 for t in targets]
    scorer.apply(counts)
    assert sum(w.numel() * w.element_size() for w in scorer._w0) == 4 * n  # the fp32 snapshot, nothing else
    ranked = MagnitudeScorer(mlp, targets, evaluate)
    ranked.reset()
    ranked._w0 = scorer.w0  # the round's weights (the model holds the candidate now)
    ranked.rank = [magnitude_rank(w) for w in scorer.w0]
    masks = [p.detach() != 0 for p in scorer.params]
    ranked.apply(counts)
    assert all(torch.equal(m, p.detach() != 0) for m, p in zip(masks, ranked.params))
    scorer.restore()
    assert all(torch.equal(before[t.name], dict(mlp.named_parameters())[t.name]) for t in targets)


def test_in_place_failure_restores_the_model_from_the_spilled_copy(mlp, evaluate, tmp_path, monkeypatch):
    """low_memory keeps prune(inplace=True)'s undo copy in a temporary file: a failure mid-run still
    puts every weight back, and the file is gone afterwards."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = {k: v.clone() for k, v in mlp.state_dict().items()}

    def failing_finetune(model, epochs):
        raise RuntimeError("out of data")

    with pytest.raises(RuntimeError, match="out of data"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=failing_finetune, sparsity=0.8,
                        progress=False, population=4, generations=1, rounds=2, sensitivity_scan=False,
                        inplace=True, low_memory=True)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from /proc")
def test_low_memory_peak_per_weight_on_a_vit():
    """low_memory on a 4.7M-weight ViT: peak RSS beyond the model, its data and one forward, per
    weight (15 with ranks, 7.2 without)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "big_models.py"), "--one", "vit_small",
                          "--low-memory"], capture_output=True, text=True, timeout=300, check=True, env=MEASURE_ENV)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["coverage"] == 1.0 and row["low_memory"]
    assert row["peak_extra_bytes_per_weight"] <= 9, row
