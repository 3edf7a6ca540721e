"""A causal LM from a user's folder (``examples/core/prune_hf_lm.py``): read with transformers, pruned,
written to a new folder that loads back pruned; the user's folder is only read; bad paths refused first."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from de_plugin.lm import decoder_layers  # noqa: E402
from tiny_llama import save_tiny_llama, write_texts  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "core" / "prune_hf_lm.py"


def load_script():
    spec = importlib.util.spec_from_file_location("prune_hf_lm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), [p.read_text() for p in sorted(text_dir.iterdir())])


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("extra", [[], ["--sequential", "--method", "sparsegpt"]])
def test_a_model_on_disk_is_pruned_into_a_new_folder(model_dir, text_dir, tmp_path, extra):
    before = digest(model_dir)
    out = tmp_path / "pruned"
    report = load_script().main([str(model_dir), "--out", str(out), "--text", str(text_dir), "--sparsity", "0.6",
                                 "--batches", "2", "--batch", "2", "--length", "32", "--eval-batches", "1", *extra])
    assert digest(model_dir) == before  # the user's folder is only read
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out)
    layers = decoder_layers(pruned)
    kept = sum(int((l.weight != 0).sum()) for l in layers)
    assert kept / sum(l.numel for l in layers) == pytest.approx(0.4, abs=1e-3)
    assert set(report) >= {"dense_perplexity", "uniform", "owl", "fisher", "search", "block_sparsity"}
    assert report["search"]["calibration_kl"] <= report["uniform"]["calibration_kl"] + 1e-9
    assert len(report["block_sparsity"]) == 2 and (out / "pruning.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert report["sequential"] == ("--sequential" in extra)


@pytest.mark.parametrize("case, match", [("no_config", "no config.json"), ("same", "the model's own folder"),
                                         ("not_empty", "not empty"), ("no_text", "does not exist")])
def test_bad_paths_are_refused_before_the_model_is_read(model_dir, tmp_path, case, match):
    script = load_script()
    out = tmp_path / "out"
    args = [str(model_dir), "--out", str(out)]
    if case == "no_config":
        args[0] = str(tmp_path)
    elif case == "same":
        args[2] = str(model_dir)
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        args += ["--text", str(tmp_path / "missing")]
    with pytest.raises(SystemExit, match=match):
        script.main(args)
    assert case != "not_empty" or (out / "keep.txt").read_text() == "mine"
