"""The NNI route on a decoder: de_layerwise through NNI's pruner, scored by the KL fitness."""
import copy

import pytest
import torch
import torch.nn.functional as F

import de_plugin_nni
from de_plugin.demo.lm import TinyGPT
from de_plugin.lm import decoder_layers, kl_score


def test_de_layerwise_through_nni_on_a_decoder_with_the_kl_fitness():
    import nni
    from nni.compression import TorchEvaluator

    torch.manual_seed(0)
    model = TinyGPT(d=32, layers=2, heads=2, context=32)
    calib = [torch.randint(0, 256, (4, 32)) for _ in range(3)]
    evaluate = kl_score(copy.deepcopy(model).eval(), calib)
    assert evaluate(model) == pytest.approx(1.0)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        for b in calib[: max_steps or len(calib)]:
            optimizers.zero_grad()
            training_step(b, model).backward()
            optimizers.step()

    def training_step(batch, model):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))

    opt = nni.trace(torch.optim.Adam)(model.parameters(), lr=1e-4)
    evaluator = TorchEvaluator(training_func, opt, training_step, evaluating_func=evaluate, dummy_input=calib[0])
    names = [l.name for l in decoder_layers(model)]
    pruner = de_plugin_nni.DELayerwisePruner(model, [{"op_names": names, "sparse_ratio": 0.6}], evaluator,
                                             population=6, generations=2, rounds=1, finetune_epochs=0,
                                             progress=False)
    _, masks = pruner.compress()
    pruned = sum(int((masks[n]["weight"] == 0).sum()) for n in names)
    total = sum(masks[n]["weight"].numel() for n in names)
    assert pruned / total == pytest.approx(0.6, abs=1e-3)
    assert "head" not in masks and len({round(float((masks[n]["weight"] == 0).float().mean()), 2)
                                         for n in names}) > 1  # an allocation, not one ratio everywhere
