"""Causal language models (de_plugin.lm): targets, in-layer methods at exact budgets, the KL fitness,
the database, the searched allocation and the errors raised before any work."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from de_plugin.demo.lm import TinyGPT, stdlib_corpus, token_batches, train_lm
from de_plugin.lm import (DenseReference, LayerDatabase, collect_stats, decoder_layers, layer_mask, nm_mask,
                          owl_densities, perplexity, prune_lm, prune_weight, row_mask, sparsegpt)
from de_plugin.search.budget import total_keep


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(limit_bytes=400_000)


@pytest.fixture(scope="module")
def tiny(corpus):
    """A small decoder trained briefly on standard-library text (seconds)."""
    torch.manual_seed(0)
    model = TinyGPT(d=32, layers=2, heads=2, context=32)
    return train_lm(model, corpus.train, 60, batch=16, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def calib(corpus):
    return token_batches(corpus.train, 8, 32, 4, seed=1)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ targets
def test_targets_are_the_decoder_blocks_linears_only(tiny):
    names = [l.name for l in decoder_layers(tiny)]
    assert names == [f"blocks.{b}.{p}" for b in range(2)
                     for p in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")]
    assert "head" not in names


def test_a_model_without_decoder_blocks_is_refused_untouched(calib):
    mlp = nn.Sequential(nn.Embedding(256, 16), nn.Linear(16, 256))
    saved = state(mlp)
    with pytest.raises(ValueError, match="no decoder blocks"):
        prune_lm(mlp, calib, 0.5, progress=False)
    assert same_state(mlp, saved)


# ------------------------------------------------------------------------------------------ fitness
def test_kl_fitness_is_the_hand_computed_divergence(tiny, calib):
    pruned = copy.deepcopy(tiny)
    with torch.no_grad():
        pruned.blocks[0].up_proj.weight.mul_(0.5)
    ref = DenseReference(tiny, calib)
    total, count = 0.0, 0
    for b in calib:
        p = F.softmax(tiny(b), -1)
        q = F.softmax(pruned(b), -1)
        total += float((p * (p.log() - q.log())).sum().detach())
        count += b.shape[0] * b.shape[1]
    assert ref.kl(pruned) == pytest.approx(total / count, rel=1e-4)
    assert ref.kl(tiny) == pytest.approx(0.0, abs=1e-6)
    nll = np.mean([F.cross_entropy(tiny(b)[:, :-1].reshape(-1, 256), b[:, 1:].reshape(-1)).item() for b in calib])
    assert perplexity(tiny, calib) == pytest.approx(np.exp(nll), rel=1e-4)


# --------------------------------------------------------------------------------- in-layer methods
def test_masks_prune_exact_counts():
    torch.manual_seed(0)
    s = torch.rand(6, 16)
    assert int((~layer_mask(s, 37)).sum()) == 37
    keep = row_mask(s, 37)  # 37 = 6 x 6 + 1: one row prunes one more
    per_row = (~keep).sum(1)
    assert int(per_row.sum()) == 37 and set(per_row.tolist()) == {6, 7}
    keep = nm_mask(s, 2, 4)
    assert torch.all(keep.reshape(6, 4, 4).sum(2) == 2)


def test_wanda_is_the_papers_per_row_rule(tiny, calib):
    layers = decoder_layers(tiny)
    stats = collect_stats(tiny, layers, calib)
    w = layers[4].weight.detach()
    x = torch.cat([h for h in _inputs(tiny, layers[4].module, calib)])
    metric = w.abs() * x.norm(dim=0)[None, :]  # |W_ij| * ||X_j||_2
    k = int(w.shape[1] * 0.6)
    expected = torch.ones_like(w, dtype=torch.bool)
    expected.scatter_(1, torch.sort(metric, dim=1, stable=True)[1][:, :k], False)
    got = prune_weight("wanda", w, k * w.shape[0], norms=stats.norms(4))
    assert torch.equal(got != 0, expected)


def _inputs(model, module, batches):
    seen = []
    h = module.register_forward_pre_hook(lambda m, i: seen.append(i[0].reshape(-1, i[0].shape[-1]).detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return seen


def test_sparsegpt_exact_count_and_smaller_output_error_than_magnitude():
    torch.manual_seed(0)
    x = 0.5 * torch.randn(2048, 64) + torch.randn(2048, 8) @ torch.randn(8, 64)  # correlated: reconstruction pays
    w = torch.randn(32, 64)
    h = x.t() @ x
    out = sparsegpt(w, h, 1229)  # 60% of 2048
    assert int((out == 0).sum()) == 1229
    err = lambda v: float(((x @ w.t() - x @ v.t()) ** 2).sum())  # noqa: E731
    assert err(out) < 0.5 * err(prune_weight("magnitude", w, 1229))
    assert err(out) < 0.5 * err(prune_weight("wanda", w, 1229, norms=x.norm(dim=0)))
    nm = sparsegpt(w, h, 0, nm=(2, 4))
    assert torch.all((nm.reshape(32, 16, 4) != 0).sum(2) == 2)


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning_per_block():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    out = sparsegpt(w, torch.eye(32) * 5.0, 128, blocksize=32)
    assert torch.equal(out != 0, prune_weight("magnitude", w, 128) != 0)
    assert torch.allclose(out[out != 0], w[out != 0])


def test_the_database_gives_the_masks_of_pruning_directly(tiny, calib):
    layers = decoder_layers(tiny)
    for method in ("magnitude", "wanda", "sparsegpt"):
        stats = collect_stats(tiny, layers, calib, hessians=method == "sparsegpt")
        db = LayerDatabase(layers, stats, method, level_step=0.1)
        for i in (0, 5):
            n = layers[i].numel
            keep = n - db.level(i, n // 3) if method == "sparsegpt" else n // 3
            direct = prune_weight(method, layers[i].weight.detach(), n - keep, norms=stats.norms(i),
                                  hessian=stats.hessians[i] if stats.hessians else None)
            assert torch.equal(db.weight(i, keep), direct)
        if method == "sparsegpt":  # levels: multiples of level_step x numel, the nearest one
            step = round(0.1 * layers[0].numel)
            assert db.level(0, layers[0].numel - 3 * step - 2) == 3 * step


# ------------------------------------------------------------------------------- allocation, search
def test_owl_keeps_more_in_blocks_with_more_outliers(tiny, calib):
    layers = decoder_layers(tiny)
    stats = collect_stats(tiny, layers, calib)
    with torch.no_grad():  # plant outliers in block 1
        for l in layers:
            if l.block == 1:
                l.weight[:, :2] *= 40.0
    dens = owl_densities(layers, stats, 0.7)
    assert dens[layers.index(next(l for l in layers if l.block == 1))] == pytest.approx(0.3 + 0.08)
    assert dens[0] == pytest.approx(0.3 - 0.08)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_search_meets_the_budget_and_is_never_worse_than_its_seeds(tiny, calib, method):
    saved = state(tiny)
    r = prune_lm(tiny, calib, 0.6, method=method, generations=3, progress=False, seed=0)
    layers = decoder_layers(r.model)
    kept = sum(int((l.weight != 0).sum()) for l in layers)
    assert kept == total_keep([l.numel for l in layers], 0.6) == sum(r.kept)
    assert r.fitness <= min(r.seed_fitness.values()) + 1e-9
    assert r.evaluations > 0 and same_state(tiny, saved)
    again = prune_lm(tiny, calib, 0.6, method=method, generations=3, progress=False, seed=0)
    assert again.kept == r.kept


def test_search_strategies_and_block_granularity(tiny, calib):
    for strategy in ("evopress", "random"):
        r = prune_lm(tiny, calib, 0.6, search_strategy=strategy, generations=2, progress=False)
        assert r.search["search_strategy"] == strategy and r.sparsity == pytest.approx(0.6, abs=1e-4)
        assert r.search["candidates"] == 4 * 3  # lambda (4) x (generations + 1), the evaluations DE would get
    r = prune_lm(tiny, calib, 0.6, search_strategy="de", generations=2, progress=False)
    assert r.search["nit"] == 2 and r.sparsity == pytest.approx(0.6, abs=1e-4)
    r = prune_lm(tiny, calib, 0.6, granularity="block", generations=2, progress=False)
    assert len(set(round(v, 2) for v in r.layer_sparsity.values())) <= 2  # one sparsity per block
    assert len(r.block_sparsity()) == 2


def test_modifier_targets_name_every_pruned_linear_once_in_model_order(tiny, calib):
    import re
    r = prune_lm(tiny, calib, 0.6, generations=2, progress=False)
    spec = r.modifier_targets()
    order = [n for n, _ in r.model.named_modules() if n in r.layer_sparsity]
    for pattern, name, s in zip(spec["targets"], order, spec["sparsity"], strict=True):
        everything = [n for n, _ in r.model.named_modules()]  # llm-compressor matches with re.match
        assert pattern.startswith("re:") and [n for n in everything if re.match(pattern[3:], n)] == [name]
        assert s == r.layer_sparsity[name]


def test_two_four_sparsity_in_every_layer(tiny, calib):
    r = prune_lm(tiny, calib, "2:4", method="wanda", progress=False)
    for l in decoder_layers(r.model):
        assert torch.all((l.weight.reshape(l.weight.shape[0], -1, 4) != 0).sum(2) <= 2)
    assert r.sparsity == pytest.approx(0.5, abs=1e-3) and r.allocation == "2:4"


def test_transformers_models_are_supported(calib):
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32,
                                                                n_layer=2, n_head=2))
    names = [l.name for l in decoder_layers(gpt2)]
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    r = prune_lm(gpt2, calib, 0.5, method="sparsegpt", generations=1, progress=False)
    assert r.sparsity == pytest.approx(0.5, abs=1e-4)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    assert len(decoder_layers(llama)) == 14
    assert prune_lm(llama, calib, "2:4", progress=False).sparsity == pytest.approx(0.5, abs=1e-3)
    for model in (gpt2, llama):  # sequential: its passes end inside the block (no logits); block 1 differs
        heads = []
        head = model.lm_head.register_forward_hook(lambda *a: heads.append(1))
        try:
            seq = prune_lm(model, calib, 0.5, allocation="uniform", sequential=True, progress=False)
            logits_seq, heads[:] = len(heads), []
            one = prune_lm(model, calib, 0.5, allocation="uniform", progress=False)
        finally:
            head.remove()
        assert logits_seq == len(heads)  # the per-block passes added no full forward
        pairs = list(zip(decoder_layers(seq.model), decoder_layers(one.model)))
        assert all(torch.equal(a.weight, b.weight) for a, b in pairs if a.block == 0)
        assert not all(torch.equal(a.weight, b.weight) for a, b in pairs if a.block == 1)


def test_screened_search_scores_few_offspring_in_full_and_keeps_the_budget(tiny, calib, monkeypatch):
    """EvoPress's multi-step selection: 8 offspring a generation screened on one calibration batch (each
    generation another), the best 2 on the search batches; cheaper per generation, so more generations fit
    the same evaluations."""
    wide = {"population": 8, "search_batches": 2}  # a screening costs half an evaluation here
    plain = prune_lm(tiny, calib, 0.6, generations=3, progress=False, seed=0, **wide)
    picks, kl = [], DenseReference.kl
    monkeypatch.setattr(DenseReference, "kl", lambda self, m, upto=None, pick=None: picks.append(pick) or kl(self, m, upto, pick))
    r = prune_lm(tiny, calib, 0.6, generations=3, survivors=2, progress=False, seed=0, **wide)
    assert {tuple(p) for p in picks if p is not None} == {(i,) for i in range(len(calib))}
    assert r.sparsity == pytest.approx(0.6, abs=1e-4) and r.fitness <= min(r.seed_fitness.values()) + 1e-9
    assert r.search["screened"] > 8 * 4  # more generations than the 3 (+ start) of the plain search
    assert r.search["nfev"] < plain.search["nfev"] / 2  # only the survivors scored in full
    assert r.evaluations <= plain.evaluations  # the same budget, screenings counted at their share


def test_kl_on_picked_batches_is_the_kl_of_those_batches(tiny, calib):
    ref = DenseReference(tiny, calib)
    noisy = copy.deepcopy(tiny)
    with torch.no_grad():
        noisy.blocks[0].q_proj.weight.mul_(0.5)
    assert ref.kl(noisy, pick=[1]) == pytest.approx(DenseReference(tiny, calib[1:2]).kl(noisy))
    assert ref.kl(noisy, pick=[1]) != pytest.approx(ref.kl(noisy, pick=[0]))


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("opts, match", [({"survivors": 9}, "more than the offspring"),
                                         ({"survivors": 2, "search_strategy": "de"}, "only search_strategy='evopress'")])
def test_survivors_that_cannot_apply_are_refused_before_work(tiny, calib, opts, match):
    saved = state(tiny)
    with pytest.raises(ValueError, match=match):
        prune_lm(tiny, calib, 0.6, progress=False, **opts)
    assert same_state(tiny, saved)

@pytest.mark.parametrize("data, match", [
    ([torch.rand(4, 32)], "integer tensor"),
    ("some text", "token batches"),
    ([torch.randint(0, 256, (4,))], "integer tensor"),
    ([torch.randint(0, 256, (4, 1))], "at least 2 tokens"),
])
def test_calibration_that_is_not_token_batches_is_refused(tiny, data, match):
    saved = state(tiny)
    with pytest.raises(ValueError, match=match):
        prune_lm(tiny, data, 0.5, progress=False)
    assert same_state(tiny, saved)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.5, -0.1, "half", True])
def test_budget_outside_zero_one_is_refused(tiny, calib, sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        prune_lm(tiny, calib, sparsity, progress=False)


def test_two_four_needs_input_widths_divisible_by_four(calib):
    model = TinyGPT(d=30, layers=1, heads=2, context=32)
    saved = state(model)
    with pytest.raises(ValueError, match="divisible by 4; layer blocks.0.q_proj has 30 inputs"):
        prune_lm(model, calib, "2:4", progress=False)
    assert same_state(model, saved)


def test_unknown_method_is_refused_before_work(tiny, calib):
    with pytest.raises(ValueError, match="method"):
        prune_lm(tiny, calib, 0.5, method="obs", progress=False)


def test_a_misleading_search_fitness_cannot_beat_the_seeds_in_the_end(tiny, calib, monkeypatch):
    """The search scores something useless (prune the first layers hardest); the finalists' re-scoring on
    every calibration batch still returns nothing worse than uniform or OWL."""
    from de_plugin.lm import search as lm_search

    monkeypatch.setattr(lm_search.LMScorer, "score", lambda self, counts, floor=None: -float(counts[0] + counts[1]))
    r = prune_lm(tiny, calib, 0.6, generations=3, progress=False)
    assert r.fitness <= min(r.seed_fitness.values()) + 1e-9
    assert r.layer_sparsity["blocks.0.q_proj"] < 0.85  # the misleading favourite (q, k at the bound) lost


def test_in_place_pruning_that_fails_half_way_leaves_the_weights_as_they_were(tiny, calib, monkeypatch):
    from de_plugin.lm import fitness as lm_fitness

    calls, kl = [0], lm_fitness.DenseReference.kl

    def fails_on_the_final_score(self, model, upto=None, pick=None):  # the seeds score, then the pruned model's does not
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("evaluation failed")
        return kl(self, model, upto, pick)

    monkeypatch.setattr(lm_fitness.DenseReference, "kl", fails_on_the_final_score)
    saved = state(tiny)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        prune_lm(tiny, calib, 0.6, allocation="uniform", inplace=True, progress=False)
    assert same_state(tiny, saved)


# ------------------------------------------------------------------------------ sequential pruning
def test_stop_early_records_the_same_statistics_without_running_the_rest_of_the_model(tiny, calib):
    layers = [l for l in decoder_layers(tiny) if l.block == 0]
    full = collect_stats(tiny, layers, calib, hessians=True)
    heads = []
    hook = tiny.head.register_forward_hook(lambda *a: heads.append(1))
    try:
        early = collect_stats(tiny, layers, calib, hessians=True, stop_early=True)
    finally:
        hook.remove()
    assert not heads  # every pass ended inside block 0
    for a, b in zip(full.norms_sq + full.hessians, early.norms_sq + early.hessians):
        assert torch.equal(a, b)
    assert early.tokens == full.tokens


def test_hessians_above_the_memory_limit_are_collected_in_runs_with_the_same_values(tiny, calib):
    from de_plugin.lm.calibration import collect_hessians, moment_bytes, runs_within

    layers = decoder_layers(tiny)
    whole = collect_stats(tiny, layers, calib, hessians=True)
    limit = moment_bytes(layers[-1])  # one of the widest inputs at a time: several runs
    runs = collect_hessians(tiny, layers, calib, limit=limit)
    for a, b in zip(whole.hessians + whole.norms_sq + whole.sums, runs.hessians + runs.norms_sq + runs.sums):
        assert torch.equal(a, b)
    assert runs.tokens == whole.tokens and len(runs.hessians) == len(layers)
    assert len(runs_within(layers, limit)) > 2 and all(sum(moment_bytes(l) for l in r) <= limit
                                                       for r in runs_within(layers, limit) if len(r) > 1)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_sequential_pruning_takes_each_blocks_statistics_from_the_blocks_before_it_as_pruned(tiny, calib, method):
    """By hand: block 0 pruned on the dense model's statistics; block 1 on statistics collected with block 0
    already pruned. The one-pass pruning gives block 1 other weights (except by magnitude, which uses none)."""
    r = prune_lm(tiny, calib, 0.6, method=method, allocation="uniform", sequential=True, progress=False)
    one_pass = prune_lm(tiny, calib, 0.6, method=method, allocation="uniform", progress=False)
    hand = copy.deepcopy(tiny)
    layers = decoder_layers(hand)
    counts = r.kept
    for b in (0, 1):
        idx = [i for i, l in enumerate(layers) if l.block == b]
        stats = collect_stats(hand, [layers[i] for i in idx], calib, hessians=method == "sparsegpt")
        for j, i in enumerate(idx):
            w = layers[i].weight.detach().clone()
            layers[i].set_weight(prune_weight(method, w, w.numel() - counts[i], norms=stats.norms(j),
                                              hessian=stats.hessians[j] if stats.hessians else None))
    got, ref = decoder_layers(r.model), decoder_layers(one_pass.model)
    for a, h in zip(got, layers):
        assert torch.equal(a.weight, h.weight), a.name
    assert r.kept == one_pass.kept and r.sparsity == pytest.approx(0.6, abs=1e-4)
    differs = [not torch.equal(a.weight, o.weight) for a, o in zip(got, ref)]
    assert not any(d for d, l in zip(differs, got) if l.block == 0)
    assert any(d for d, l in zip(differs, got) if l.block == 1) == (method != "magnitude")
    assert r.seed_fitness["uniform"] == pytest.approx(r.fitness)  # the seeds are measured the same way


def test_by_default_a_candidate_is_scored_on_one_batch_and_finalists_on_all(tiny, calib, monkeypatch):
    """One calibration batch per candidate buys four times the generations of four batches per candidate;
    the finalists and seeds are then compared on every batch."""
    seen, kl = [], DenseReference.kl
    monkeypatch.setattr(DenseReference, "kl", lambda self, m, upto=None, pick=None: seen.append(upto) or kl(self, m, upto, pick))
    r = prune_lm(tiny, calib, 0.6, generations=3, progress=False, seed=0, search_strategy="evopress")
    assert seen.count(1) == r.search["nfev"] == 4 * 4  # lambda 4 x (3 generations + the start)
    assert set(seen) == {1, None}  # None: all the batches (finalists, seeds, the final model)
    assert r.search["batches_forwarded"] == 16 + r.search["finalists"] * len(calib)


def test_a_search_on_few_tokens_says_so(tiny, calib, caplog):
    short = [b[:2, :16] for b in calib]  # 32 tokens a batch
    with caplog.at_level("WARNING", logger="de_plugin"):
        prune_lm(tiny, short, 0.6, generations=1, progress=False)
    assert "32 calibration tokens" in caplog.text and "search_batches" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="de_plugin"):
        prune_lm(tiny, calib, 0.6, generations=1, search_batches=4, progress=False)  # 4 x 256 tokens
    assert "calibration tokens" not in caplog.text


def test_the_curvature_allocation_meets_the_budget_and_its_cost_is_counted(tiny, calib):
    saved = state(tiny)
    r = prune_lm(tiny, calib, 0.6, allocation="fisher", progress=False)
    layers = decoder_layers(r.model)
    assert sum(int((l.weight != 0).sum()) for l in layers) == total_keep([l.numel for l in layers], 0.6)
    assert r.allocation == "fisher" and r.evaluations == 3 and "fisher" in r.seed_fitness
    assert len(set(round(v, 3) for v in r.layer_sparsity.values())) > 2  # per layer, not uniform
    assert same_state(tiny, saved)
    s = prune_lm(tiny, calib, 0.6, generations=2, fisher_seed=True, max_evals=12, progress=False)
    assert "fisher" in s.seed_fitness and s.fitness <= s.seed_fitness["fisher"] + 1e-9
    assert s.search["nfev"] <= 12 - 3  # the backward passes came out of the search's evaluations


def test_a_deep_decoder_searches_at_the_default_population(calib):
    """(1 + lambda) offspring are not DE's population: a decoder with 48 Linear layers (and 16 width values)
    searches with the default 4 a generation, as a 32-block, 224-layer one does."""
    from de_plugin.lm.width import prune_width

    torch.manual_seed(0)
    deep = TinyGPT(d=16, layers=8, heads=2, context=32).eval()
    r = prune_lm(deep, calib, 0.5, generations=1, progress=False)
    assert len(r.layers) == 48 and r.evaluations > 0
    assert prune_width(deep, calib, 0.3, generations=1, progress=False).evaluations > 0
    with pytest.raises(ValueError, match="too small for a 48-dimensional search"):
        prune_lm(deep, calib, 0.5, search_strategy="de", population=4, progress=False)


def test_the_default_search_budget_grows_with_the_layers(calib, monkeypatch):
    """832 evaluations up to 32 searched values, 26 per value above: a 48-layer decoder gets 1,248."""
    from de_plugin.lm import search as lm_search

    assert lm_search.default_generations(lm_search.LMOptions(), 24) == 207  # (207 + 1) x 4 = 832
    assert lm_search.default_generations(lm_search.LMOptions(), 48) == 311  # (311 + 1) x 4 = 1,248
    assert lm_search.default_generations(lm_search.LMOptions(generations=5), 48) == 5
    seen, start = [], lm_search.start_search

    def recording(backend, o, *a, **k):
        seen.append(o.generations)
        return start(backend, o, *a, **k)

    monkeypatch.setattr(lm_search, "start_search", recording)
    torch.manual_seed(0)
    deep = TinyGPT(d=16, layers=8, heads=2, context=32).eval()
    prune_lm(deep, calib, 0.5, max_evals=8, progress=False)
    assert seen == [311]
