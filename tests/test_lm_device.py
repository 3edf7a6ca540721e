"""Language-model pruning with the model on a device other than the CPU.

Users prune language models on GPUs. CI has none, so these tests hold the model on torch's lazy-tensor
device (TorchScript backend, computed on the CPU): like CUDA, it refuses any operation that mixes its
tensors with CPU ones, so every statistic, mask, solve and sample the LM path creates on the CPU by
mistake fails here as it would on a GPU. Each result must equal the CPU run's (on the lazy device, which
computes as the CPU does; where a GPU is present the same calls run on it too, and must land near the CPU's:
its sums and its random draws differ, so a search may end elsewhere).
"""
import copy

import pytest
import torch

from de_plugin.demo.lm import TinyGPT
from de_plugin.lm import kl_score, perplexity, prune_lm, sparsegpt
from de_plugin.lm.width import prune_width


@pytest.fixture(scope="module", params=["lazy", "cuda"])
def device(request):
    """torch's lazy tensors everywhere; a real GPU where there is one."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no GPU here")
        return torch.device("cuda")
    try:
        from torch._lazy import ts_backend
        ts_backend.init()
    except Exception as e:  # a torch build without the TorchScript lazy backend
        pytest.skip(f"torch's lazy tensors are not available here: {e}")
    return torch.device("lazy")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyGPT(d=32, layers=2, heads=4, context=32).eval()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (8, 32), generator=g) for _ in range(4)]


def on(model, device):
    return copy.deepcopy(model).to(device)


def same(there, cpu, device):
    """Exactly the CPU's on the lazy device; near it on a GPU."""
    if device.type == "lazy":
        return there.kept == cpu.kept and there.fitness == pytest.approx(cpu.fitness, rel=1e-3)
    return there.sparsity == pytest.approx(cpu.sparsity, abs=1e-6) and there.fitness == pytest.approx(cpu.fitness, rel=0.25)


@pytest.mark.parametrize("opts", [
    {"method": "wanda", "generations": 2},
    {"method": "magnitude", "allocation": "owl"},
    {"method": "wanda", "allocation": "fisher"},
    {"method": "wanda", "allocation": "uniform", "sequential": True},
    {"method": "wanda", "allocation": "uniform", "fitness": "perplexity"},
], ids=["search", "owl", "fisher", "sequential", "perplexity"])
def test_prune_lm_on_another_device_gives_the_cpu_result(model, calib, device, opts):
    cpu = prune_lm(model, calib, 0.5, progress=False, **opts)
    # calibration left on the CPU: the tokens follow the model to its device
    there = prune_lm(on(model, device), calib, 0.5, progress=False, **opts)
    assert same(there, cpu, device)
    assert next(there.model.parameters()).device.type == device.type


@pytest.mark.parametrize("refit", [True, False])
def test_prune_width_on_another_device_gives_the_cpu_result(model, calib, device, refit):
    cpu = prune_width(model, calib, 0.3, generations=2, refit=refit, progress=False)
    there = prune_width(on(model, device), calib, 0.3, generations=2, refit=refit, progress=False)
    if device.type != "lazy":
        assert there.removed == pytest.approx(cpu.removed, abs=0.01)
        assert there.fitness == pytest.approx(cpu.fitness, rel=0.25)
        return
    assert (there.heads, there.units) == (cpu.heads, cpu.units)
    assert there.fitness == pytest.approx(cpu.fitness, rel=1e-3, abs=1e-6)
    tokens = calib[0]
    assert torch.allclose(there.model(tokens.to(device)).cpu(), cpu.model(tokens), atol=1e-4)


def test_fitness_and_sparsegpt_on_another_device(model, calib, device):
    moved = on(model, device)
    assert perplexity(moved, calib) == pytest.approx(perplexity(model, calib), rel=1e-5)
    assert kl_score(model, calib)(moved) == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 16, generator=g), torch.randn(64, 16, generator=g)
    h = x.t() @ x
    atol = 1e-5 if device.type == "lazy" else 1e-3
    assert torch.allclose(sparsegpt(w.to(device), h.to(device), 40).cpu(), sparsegpt(w, h, 40), atol=atol)


def test_in_place_pruning_that_fails_keeps_its_undo_copy_on_the_host_and_restores_the_device_model(
        model, calib, device, monkeypatch):
    from de_plugin import pruner
    from de_plugin.lm import fitness as lm_fitness

    copies, undo = [], pruner.Undo.__init__

    def seen(self, m, spill):
        undo(self, m, spill)
        copies.append(self.state)

    def fails(self, m, upto=None, pick=None):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(pruner.Undo, "__init__", seen)
    monkeypatch.setattr(lm_fitness.DenseReference, "kl", fails)
    moved = on(model, device)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        prune_lm(moved, calib, 0.6, allocation="uniform", inplace=True, progress=False)
    assert copies and all(v.device.type == "cpu" for v in copies[0].values())  # accelerator memory left alone
    for (k, v), w in zip(moved.state_dict().items(), model.state_dict().values()):
        assert v.device.type == device.type and torch.equal(v.cpu(), w), k


def test_sparsegpt_hessians_collected_in_runs_wait_in_host_memory(calib, device, monkeypatch):
    """Above the moment limit SparseGPT's Hessians are collected a run of layers at a time and kept on the
    host; each layer's is moved to the device for its own reconstruction."""
    from de_plugin.lm import calibration, search

    torch.manual_seed(0)
    small = TinyGPT(d=16, layers=1, heads=2, context=32, mlp=32).eval()
    monkeypatch.setattr(calibration, "MOMENT_BYTES", 8 * 33 ** 2)  # one down projection's moments
    held, collect = [], search.collect_hessians

    def recording(*a, **k):
        stats = collect(*a, **k)
        held.extend(h.device.type for h in stats.hessians)
        return stats

    monkeypatch.setattr(search, "collect_hessians", recording)
    cpu = prune_lm(small, calib[:2], 0.5, method="sparsegpt", allocation="uniform", progress=False)
    held.clear()
    there = prune_lm(on(small, device), calib[:2], 0.5, method="sparsegpt", allocation="uniform", progress=False)
    assert held and set(held) == {"cpu"}
    assert same(there, cpu, device)
