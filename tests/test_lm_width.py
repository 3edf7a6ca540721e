"""Structured width of decoders (de_plugin.lm.width): heads and hidden units per block, sliced away."""
import copy

import pytest
import torch

from de_plugin.demo.lm import TinyGPT
from de_plugin.lm import DenseReference
from de_plugin.lm.width import WidthMasks, decoder_params, prune_width, refit, width_blocks


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return TinyGPT(d=32, layers=2, heads=4, context=32).eval()


@pytest.fixture()
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (4, 32), generator=g) for _ in range(4)]


def test_slicing_gives_the_outputs_of_the_masked_model(model, calib):
    blocks = width_blocks(model)
    norms = {b.mlp_out: torch.rand(b.units) for b in blocks} | {b.attn["o"]: torch.rand(32) for b in blocks}
    masked = copy.deepcopy(model)
    masks = WidthMasks(masked, width_blocks(masked), norms)
    counts = [3, 2, 70, 90]  # heads of block 0, 1; hidden units of block 0, 1
    masks.apply(counts)
    from de_plugin.lm.width import slice_width
    sliced = copy.deepcopy(model)
    slice_width(sliced, width_blocks(sliced), WidthMasks(sliced, width_blocks(sliced), norms).kept(counts))
    assert sliced.blocks[0].q_proj.out_features == 24 and sliced.blocks[1].heads == 2
    assert sliced.blocks[1].down_proj.in_features == 90
    assert torch.allclose(masked(calib[0]), sliced(calib[0]), atol=1e-5)


def test_the_parameter_budget_holds_to_one_hidden_unit(model, calib):
    for allocation in ("uniform", "search"):
        r = prune_width(model, calib, 0.3, allocation=allocation, generations=2, progress=False)
        assert r.params_before == decoder_params(model)
        assert r.params_after == decoder_params(r.model)
        assert abs(r.params_after - 0.7 * r.params_before) <= width_blocks(model)[0].unit_cost
    u = prune_width(model, calib, 0.3, allocation="uniform", progress=False)
    assert len(set(u.heads)) == 1 and max(u.units) - min(u.units) <= 1
    mlp = prune_width(model, calib, 0.3, heads=False, generations=1, progress=False)
    assert mlp.heads == [4, 4] and mlp.removed == pytest.approx(0.3, abs=0.01)


def test_search_is_never_worse_than_uniform_width_and_model_untouched(model, calib):
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    r = prune_width(model, calib, 0.3, generations=3, progress=False)
    assert r.fitness <= min(r.seed_fitness.values()) + 1e-9
    assert r.fitness == pytest.approx(DenseReference(model, calib).kl(r.model), rel=1e-4)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_llama_heads_and_grouped_query_attention(calib):
    transformers = pytest.importorskip("transformers")
    for kv, pruned_heads in ((2, True), (1, False)):
        torch.manual_seed(0)
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=kv, max_position_embeddings=32)).eval()
        assert bool(width_blocks(llama)[0].attn) == pruned_heads  # grouped-query attention: MLP only
        r = prune_width(llama, calib, 0.3, generations=1, progress=False)
        assert r.fitness == pytest.approx(DenseReference(llama, calib).kl(r.model), rel=1e-3)
        assert r.removed == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("refit", [False, True, "final"])
def test_grouped_query_heads_go_with_their_key_value_head(calib, refit):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()
    b = width_blocks(llama)[0]
    assert b.heads == 2 and b.group == 2  # two key / value heads, each with two query heads
    assert b.head_cost == 8 * (2 * (32 + 32) + 32 + 32)  # head_dim x (2 query rows + 2 output columns + k + v rows)
    r = prune_width(llama, calib, 0.5, allocation="uniform", refit=refit, progress=False)
    attn = r.model.model.layers[0].self_attn
    assert r.heads == [2, 2] and attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8
    assert attn.o_proj.in_features == 16 and r.params_after == decoder_params(r.model)
    assert r.fitness == pytest.approx(DenseReference(llama, calib).kl(r.model), rel=1e-3)  # sliced = scored


def test_refit_is_the_least_squares_fit_of_the_dense_output_on_the_kept_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) + 0.5  # tokens x inputs, not centred: the bias matters
    x[:, 5] = x[:, 0] - 2 * x[:, 1]  # a removed input the kept ones carry exactly
    w, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, False, False])
    h, sums = x.t() @ x, x.sum(0)
    new_w, new_b = refit(w, b, h, sums, len(x), keep, damp=0.0)
    target = x @ w.t() + b
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    best = torch.linalg.lstsq(design, target).solution  # (kept + 1) x out
    assert torch.allclose(new_w[:, keep], best[:-1].t(), atol=1e-8) and torch.allclose(new_b, best[-1], atol=1e-8)
    assert torch.equal(new_w[:, ~keep], torch.zeros(3, 3, dtype=torch.float64))
    same_w, same_b = refit(w, b, h, sums, len(x), torch.ones(6, dtype=torch.bool), damp=0.0)
    assert torch.allclose(same_w, w) and torch.allclose(same_b, b)  # nothing removed: nothing changes
    nb_w, nb_b = refit(w, None, h, sums, len(x), keep, damp=0.0)
    assert nb_b is None and torch.allclose(nb_w[:, keep], torch.linalg.lstsq(x[:, keep], x @ w.t()).solution.t())


def test_refit_width_scores_what_it_slices_and_fits_better_than_zeroing(model, calib):
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    plain = prune_width(model, calib, 0.3, allocation="uniform", refit=False, progress=False)
    fitted = prune_width(model, calib, 0.3, allocation="uniform", progress=False)
    assert fitted.refit and not plain.refit  # on by default while the moments fit in memory
    assert fitted.heads == plain.heads and fitted.units == plain.units  # the same units removed
    assert fitted.fitness < 0.9 * plain.fitness
    assert fitted.fitness == pytest.approx(DenseReference(model, calib).kl(fitted.model), rel=1e-4)
    searched = prune_width(model, calib, 0.3, generations=2, progress=False)
    assert searched.fitness == pytest.approx(DenseReference(model, calib).kl(searched.model), rel=1e-4)
    assert searched.fitness <= fitted.fitness + 1e-9
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_the_final_refit_streams_its_moments_and_fits_as_the_in_memory_one(model, calib, monkeypatch):
    """Above the memory limit the search goes without the refit and the final widths are re-fitted a run of
    layers at a time, never holding more moments than the limit: the same weights as the in-memory refit."""
    import de_plugin.lm.width as width
    limit = 8 * 129 ** 2  # one down layer's moments (128 inputs + the bias), under the model's 2 x (33^2 + 129^2) x 8
    monkeypatch.setattr(width, "REFIT_AUTO_BYTES", limit)
    held, collect = [], width.collect_stats

    def recording(m, layers, batches, hessians=False, stop_early=False):
        if hessians:
            held.append(sum(8 * (l.in_features + 1) ** 2 for l in layers))
        return collect(m, layers, batches, hessians=hessians, stop_early=stop_early)

    monkeypatch.setattr(width, "collect_stats", recording)
    streamed = prune_width(model, calib, 0.3, allocation="uniform", progress=False)
    assert streamed.refit == "final" and len(held) == 4 and max(held) <= limit  # one layer per run here
    held.clear()
    whole = prune_width(model, calib, 0.3, allocation="uniform", refit=True, progress=False)
    assert whole.refit is True and held == [2 * 8 * (33 ** 2 + 129 ** 2)]  # everything at once
    assert (streamed.heads, streamed.units) == (whole.heads, whole.units)
    assert torch.allclose(streamed.model(calib[0]), whole.model(calib[0]), atol=1e-5)
    assert streamed.fitness == pytest.approx(whole.fitness, rel=1e-4)
    searched = prune_width(model, calib, 0.3, generations=2, progress=False)
    assert searched.refit == "final"
    assert searched.fitness == pytest.approx(DenseReference(model, calib).kl(searched.model), rel=1e-4)
    assert searched.fitness < searched.search["fitness_before_refit"]  # the final refit is in the model
    assert not prune_width(model, calib, 0.3, allocation="uniform", refit=False, progress=False).refit


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, "0.3"])
def test_a_ratio_outside_zero_one_is_refused(model, calib, ratio):
    with pytest.raises(ValueError, match="share of the decoder"):
        prune_width(model, calib, ratio, progress=False)


def test_blocks_without_a_known_mlp_are_refused(calib):
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32,
                                                                n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="has no MLP of nn.Linear layers"):
        prune_width(gpt2, calib, 0.3, progress=False)
