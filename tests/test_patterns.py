"""The core's pattern masks (``1x1``, ``NxM``, ``N:M``): exact counts, block structure, INC's layout, and
the pattern search that INC 3.8+'s route runs (framework-free here)."""
import numpy as np
import pytest
import torch
from torch import nn

from de_plugin.adapter import PatternScorer, as_matrix, parse_pattern, pattern_mask


@pytest.fixture
def conv_weight():
    torch.manual_seed(0)
    return torch.randn(8, 4, 3, 3)


def test_unstructured_prunes_the_smallest_exactly():
    w = torch.randn(16, 32)
    keep = pattern_mask(w, 0.75, "1x1")
    assert int((~keep).sum()) == 384
    assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_blocks_run_over_output_channels_in_incs_layout(conv_weight):
    keep = pattern_mask(conv_weight, 0.5, "4x1")
    m = as_matrix(keep)  # [C_out, kh*kw*C_in], input channels innermost (INC's permute(0, 2, 3, 1))
    assert m.shape == (8, 36)
    blocks = m.reshape(2, 4, 36)
    assert torch.equal(blocks.all(1), blocks.any(1))  # each 4x1 block kept or pruned whole
    assert float((~keep).float().mean()) == 0.5
    # the kept blocks are the ones with the largest mean magnitude
    score = as_matrix(conv_weight).abs().reshape(2, 4, 36).mean(1)
    assert score[blocks.all(1)].min() >= score[~blocks.any(1)].max()


def test_n_of_m_never_exceeds_its_ceiling_and_prunes_the_smallest_runs():
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    full = pattern_mask(w, 0.5, "2:4")
    runs = (~full).reshape(6, 4, 4).sum(-1)
    assert torch.all(runs == 2)  # at the ceiling every run of 4 loses its 2 smallest
    small = w.abs().reshape(6, 4, 4).sort(-1).values
    assert torch.allclose(w.abs()[~full].sort().values, small[..., :2].flatten().sort().values)
    half = pattern_mask(w, 0.25, "2:4")
    assert float((~half).float().mean()) == 0.25 and int((~half).reshape(6, 4, 4).sum(-1).max()) == 2
    assert torch.all(~full[~half])  # a lower sparsity prunes a subset of the same candidates


@pytest.mark.parametrize("spec, error", [("2-4", "unknown pattern"), ("4:2", "unknown pattern"),
                                         ("0x4", "unknown pattern")])
def test_bad_patterns_say_what_is_accepted(spec, error):
    with pytest.raises(ValueError, match=error):
        parse_pattern(spec)


def test_out_of_reach_sparsity_is_refused():
    with pytest.raises(ValueError, match="out of reach for pattern 2:4"):
        pattern_mask(torch.randn(4, 8), 0.6, "2:4")


def test_indivisible_layers_are_named_before_any_search():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="'1' .* cannot be cut into 4x1 blocks"):
        PatternScorer({"0": model[0], "1": model[1]}, lambda: 1.0, "4x1")


def test_pattern_scorer_scores_masks_and_restores_weights():
    torch.manual_seed(2)
    layer = nn.Linear(16, 8)
    before = layer.weight.detach().clone()
    seen = []
    scorer = PatternScorer({"fc": layer}, lambda: seen.append(float((layer.weight == 0).float().mean())) or 0.5,
                           "4x1")
    assert scorer.score(np.array([32])) == 0.5  # keep 32 of 128 weights
    assert seen == [0.75] and torch.equal(layer.weight, before)
