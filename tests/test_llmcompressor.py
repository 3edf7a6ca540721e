"""The searched allocation in llm-compressor (its own environment: it pins transformers <= 5.17): the
per-block list ``result.block_sparsity()`` is what its SparseGPT / Wanda modifiers take as ``sparsity``
with the decoder layers as ``targets``, and the model they return has those sparsities block by block (to
within one weight per row: Wanda rounds each row's count, which on this 32-input model is 3 points)."""
from __future__ import annotations

import pytest
import torch

llmcompressor = pytest.importorskip("llmcompressor")
transformers = pytest.importorskip("transformers")

from de_plugin import prune_lm  # noqa: E402
from de_plugin.lm import decoder_layers  # noqa: E402
from tiny_llama import save_tiny_llama, write_texts  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    texts = write_texts(tmp_path_factory.mktemp("text"))
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), [p.read_text() for p in sorted(texts.iterdir())],
                           layers=3)


def block_sparsity(model) -> list[float]:
    layers = decoder_layers(model)
    out = []
    for b in sorted({l.block for l in layers}):
        ls = [l for l in layers if l.block == b]
        out.append(1 - sum(int((l.weight != 0).sum()) for l in ls) / sum(l.numel for l in ls))
    return out


@pytest.mark.parametrize("modifier", ["SparseGPTModifier", "WandaPruningModifier"])
def test_block_sparsities_are_what_llm_compressor_prunes_to(folder, modifier):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer((folder / "tokenizer.json").read_text()).input_ids  # any text: the tokenizer's own file
    calib = [torch.tensor(ids[i:i + 4 * 32]).view(4, 32) for i in range(0, 4 * 4 * 32, 4 * 32)]
    r = prune_lm(model, calib, 0.6, granularity="block", generations=3, progress=False)
    target = r.block_sparsity()
    assert len(target) == 3 and max(target) - min(target) > 0.02  # a searched, non-uniform allocation
    rows = [row.tolist() for b in calib for row in b]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 32 for _ in rows]})
    recipe = getattr(pruning, modifier)(sparsity=target, targets=["LlamaDecoderLayer"], ignore=["re:.*lm_head"])
    oneshot(model=model, dataset=ds, recipe=recipe, processor=tokenizer, num_calibration_samples=len(rows),
            max_seq_length=32)
    per_row = 1 / min(l.in_features for l in decoder_layers(model))  # Wanda keeps whole weights per row
    assert block_sparsity(model) == pytest.approx(target, abs=per_row)


def test_per_layer_targets_prune_each_linear_to_its_searched_sparsity(folder):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer((folder / "tokenizer.json").read_text()).input_ids
    calib = [torch.tensor(ids[i:i + 4 * 32]).view(4, 32) for i in range(0, 4 * 4 * 32, 4 * 32)]
    r = prune_lm(model, calib, 0.6, generations=3, progress=False)
    spec = r.modifier_targets()
    assert len(spec["targets"]) == len(spec["sparsity"]) == len(r.layers)
    target = dict(zip(r.layers, (r.layer_sparsity[n] for n in r.layers)))
    assert max(target.values()) - min(target.values()) > 0.05  # a per-layer allocation, not a per-block one
    rows = [row.tolist() for b in calib for row in b]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 32 for _ in rows]})
    oneshot(model=model, dataset=ds, recipe=WandaPruningModifier(**spec, ignore=["re:.*lm_head"]), processor=tokenizer,
            num_calibration_samples=len(rows), max_seq_length=32)
    for layer in decoder_layers(model):  # Wanda keeps whole weights per row
        got = 1 - int((layer.weight != 0).sum()) / layer.numel
        assert got == pytest.approx(target[layer.name], abs=1 / layer.in_features), layer.name
