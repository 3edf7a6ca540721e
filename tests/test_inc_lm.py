"""A searched language-model allocation run by INC 3.7's own SparseGPT, one config entry per layer."""
import pytest
import torch

import de_plugin_inc
from conftest import same_state, state_of
from de_plugin.demo.lm import TinyGPT
from de_plugin.lm import decoder_layers, prune_lm
from de_plugin_inc.lm import layer_order, pruning_configs, prune_with_inc


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = TinyGPT(d=32, layers=2, heads=2, context=32).eval()
    calib = [torch.randint(0, 256, (4, 32)) for _ in range(3)]
    return model, calib


def test_one_entry_per_layer_in_the_decoders_order(setup):
    model, calib = setup
    r = prune_lm(model, calib, 0.6, generations=1, progress=False)
    entries = pruning_configs(r)
    assert [e["op_names"][0] for e in entries] == [f"^{n.replace('.', chr(92) + '.')}$" for n in layer_order(model)]
    assert [e["target_sparsity"] for e in entries] == list(r.layer_sparsity.values())
    assert {e["pruning_type"] for e in entries} == {"sparse_gpt"}


def test_inc_sparsegpt_prunes_each_layer_to_the_searched_sparsity(setup):
    model, calib = setup
    r = prune_lm(model, calib, 0.6, method="sparsegpt", generations=1, progress=False)
    want = {n: 0.3 + 0.04 * i for i, n in enumerate(r.layer_sparsity)}  # spread wide: a uniform pass would fail
    prune_with_inc(model, want, calib)
    for l in decoder_layers(model):
        assert float((l.weight == 0).float().mean()) == pytest.approx(want[l.name], abs=0.01)
    assert "forward" not in model.blocks[0].__dict__ and not hasattr(model, "device")  # INC's quirks undone
    assert model(calib[0]).shape == (4, 32, 256)


def test_transformers_llama_through_inc():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32)).eval()
    calib = [torch.randint(0, 256, (2, 16)) for _ in range(2)]
    r = prune_lm(llama, calib, 0.5, method="sparsegpt", generations=1, progress=False)
    prune_with_inc(llama, r, calib)
    got = {l.name: float((l.weight == 0).float().mean()) for l in decoder_layers(llama)}
    for name, s in r.layer_sparsity.items():
        assert got[name] == pytest.approx(s, abs=0.01)


def test_an_allocation_for_another_model_is_refused_untouched(setup):
    model, calib = setup
    saved = state_of(model)
    with pytest.raises(ValueError, match="does not have"):
        prune_with_inc(model, {"transformer.h.0.attn.c_attn": 0.5}, calib)
    with pytest.raises(ValueError, match="token batches"):
        prune_with_inc(model, {"blocks.0.q_proj": 0.5}, "text")
    assert same_state(state_of(model), saved)
    assert de_plugin_inc.ROUTE == "legacy"


def test_a_failing_inc_pass_leaves_the_weights_as_they_were(setup, monkeypatch):
    import neural_compressor.compression.pruner as inc_pruner

    model, calib = setup
    saved = state_of(model)

    def half_then_fail(model, config, **kwargs):
        with torch.no_grad():
            model.blocks[0].q_proj.weight.zero_()
        raise RuntimeError("INC failed")

    monkeypatch.setattr(inc_pruner, "prepare_pruning", half_then_fail)
    with pytest.raises(RuntimeError, match="INC failed"):
        prune_with_inc(model, {"blocks.0.q_proj": 0.5}, calib)
    assert same_state(state_of(model), saved)
