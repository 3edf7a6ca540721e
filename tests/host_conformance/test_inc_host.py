"""INC host conformance: INC 3.7.1's own pruning tests (intel/neural-compressor v3.7.1,
``test/pruning_with_pt/pruning_2.x``), run with their configs for the built-in pruning types, and with
``pruning_type="de_layerwise"`` substituted in every entry.

Scenarios, each upstream's ``local_configs`` and global settings unchanged:
* ``basic``       - test_pruning.py::test_pruning_basic: layer1 8x2 magnitude_progressive (with upstream's
  ``false_key``), layer2 2:4, layer3 5x1 snip_progressive; global 0.8, steps 1-10, 2 epochs.
* ``schedulers``  - test_pruning_schedulers.py: layer1 global-scope 4x1 magnitude steps 0-2 (excluding
  layer2), layer2 local 32x1 snip_momentum steps 1-10 every 2, exp decay; global 0.9, 2 epochs.
* ``patterns``    - test_pruning_patterns.py: layer1 5:8 magnitude, layer2 global-scope 1xchannel (no
  target of its own: the global 0.8), layer3 4x2 snip_progressive steps 2-20 every 5; global cos decay,
  ``excluded_op_names=["downsample.*"]``, ``min_sparsity_ratio_per_op=0.1``, steps 1-10, 5 epochs.
* ``classifier``  - test_auto_excluding_classifier.py: every Linear and conv selected, the classifier left out.
* ``prepare_pruning`` - not upstream: the ``prepare_pruning(model, config, optimizer)`` route (INC's
  forward pre-hook drives the steps), which the README advertises.

Upstream's model, torchvision's ResNet-18 (random weights), the SGD optimizer (lr 1e-4), 10 training
samples a batch of one (10 steps an epoch) and INC's callbacks loop are kept. Asserted, where upstream only
runs the loop: every selected layer INC can prune ends at its entry's target as INC measures a pattern's blocks
(built-ins within INC's own tolerance, ours at the target over the entry's layers), the
``excluded_op_names`` and the classifier untouched, ``min_sparsity_ratio_per_op`` held by every layer
of ours (INC's types do not promise it per layer).

Differences from upstream: 64x64 inputs instead of 224x224 (a tenth of the time; ResNet-18's global
pooling makes both valid, and 64 is the least that leaves its last BatchNorms more than one value a
channel at batch 1); the training samples are 10 Fashion-MNIST images (grey copied to 3 channels,
padded to 32x32 and scaled to 64x64) with their labels instead of ``Datasets('pytorch')['dummy']``'s uniform noise; the DE
fitness (``eval_func``) is the share of 64 held-out Fashion-MNIST images on which the pruned model predicts
what the dense model predicts (an untrained ResNet-18 has no accuracy worth searching for; agreement with
its own dense outputs is what pruning should keep), population 4, 1 generation.

Seen while making the checks that upstream leaves out: INC 3.7.1 prunes an NxM pattern only in layers
whose weight divides into its blocks and leaves the rest unpruned with a warning, so upstream's
``basic`` layer3 entry (5x1 on 256-channel convs) prunes nothing, for its own type and for ours alike
(asserted: those layers stay dense).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("neural_compressor")

from neural_compressor.training import WeightPruningConfig, prepare_compression  # noqa: E402

import de_plugin_inc  # noqa: E402,F401 - registers pruning_type="de_layerwise"
from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tvzoo  # noqa: E402

DE = {"population": 4, "generations": 1}


@pytest.fixture(scope="module")
def images():
    s = load_idx_dataset(FASHION_MNIST_DIR, val_size=64, train_limit=10, seed=0, size=32)
    rgb = lambda x: torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=64)  # noqa: E731
    return rgb(s.x_train[:10]), s.y_train[:10], rgb(s.x_val)


def model_and_eval(images):
    torch.manual_seed(0)
    model = tvzoo.import_torchvision().resnet18()
    model.eval()
    with torch.no_grad():
        dense = model(images[2]).argmax(1)

    def eval_func(m):
        was = m.training
        m.eval()
        with torch.no_grad():
            agree = float((m(images[2]).argmax(1) == dense).float().mean())
        m.train(was)
        return agree

    return model, eval_func


def loop(model, config, images, epochs, route="callbacks"):
    """INC's training loop of its tests (callbacks), or prepare_pruning's hooked model + optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    crit = nn.CrossEntropyLoss()
    data = [(images[0][i:i + 1], images[1][i:i + 1]) for i in range(10)]
    if route == "prepare_pruning":
        from neural_compressor.compression.pruner import prepare_pruning

        prepare_pruning(model, config, optimizer=opt)
        for _ in range(epochs):
            for x, y in data:
                crit(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        return
    cm = prepare_compression(model=model, confs=config)
    cm.callbacks.on_train_begin()
    for epoch in range(epochs):
        model.train()
        cm.callbacks.on_epoch_begin(epoch)
        for step, (x, y) in enumerate(data):
            cm.callbacks.on_step_begin(step)
            loss = crit(model(x), y)
            opt.zero_grad()
            loss.backward()
            cm.callbacks.on_before_optimizer_step()
            opt.step()
            cm.callbacks.on_after_optimizer_step()
            cm.callbacks.on_step_end()
        cm.callbacks.on_epoch_end()
    cm.callbacks.on_train_end()


def layers(model, prefix, excluded=()):
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Conv2d)
            and not any(e.rstrip(".*") in n for e in excluded)}


def fits(mod, pattern):
    """INC prunes an NxM block pattern only where the weight's (out, in*kh*kw) matrix divides into blocks;
    it leaves other layers unpruned with a warning ("cannot be divided by 5x1")."""
    if "x" not in pattern or not all(p.isdigit() for p in pattern.split("x")):
        return True
    n, m = (int(p) for p in pattern.split("x"))
    return mod.weight.shape[0] % n == 0 and mod.weight[0].numel() % m == 0


def sparsity(mods):
    return sum(int((m.weight == 0).sum()) for m in mods.values()) / sum(m.weight.numel() for m in mods.values())


BASIC = [{"op_names": ["layer1.*"], "target_sparsity": 0.5, "pattern": "8x2", "pruning_type": "magnitude_progressive",
          "false_key": "this is to test unsupport keys"},
         {"op_names": ["layer2.*"], "target_sparsity": 0.5, "pattern": "2:4"},
         {"op_names": ["layer3.*"], "target_sparsity": 0.7, "pattern": "5x1", "pruning_type": "snip_progressive"}]
SCHEDULERS = [{"start_step": 0, "end_step": 2, "pruning_type": "magnitude", "op_names": ["layer1.*"],
               "excluded_op_names": ["layer2.*"], "pruning_scope": "global", "target_sparsity": 0.5, "pattern": "4x1"},
              {"start_step": 1, "end_step": 10, "pruning_type": "snip_momentum", "pruning_frequency": 2,
               "op_names": ["layer2.*"], "pruning_scope": "local", "target_sparsity": 0.75, "pattern": "32x1",
               "sparsity_decay_type": "exp"}]
PATTERNS = [{"op_names": ["layer1.*"], "target_sparsity": 0.5, "pattern": "5:8", "pruning_type": "magnitude"},
            {"op_names": ["layer2.*"], "pattern": "1xchannel", "pruning_scope": "global"},
            {"start_step": 2, "end_step": 20, "op_names": ["layer3.*"], "target_sparsity": 0.666666, "pattern": "4x2",
             "pruning_type": "snip_progressive", "pruning_frequency": 5}]
CLASSIFIER = [{"op_names": ["layer4.*", "fc"], "target_sparsity": 0.5, "pattern": "1x1"}]


def scenario(name):
    """(entries, global settings, epochs, route) of a scenario."""
    if name == "basic":
        return BASIC, {"target_sparsity": 0.8, "start_step": 1, "end_step": 10}, 2, "callbacks"
    if name == "schedulers":
        return SCHEDULERS, {"target_sparsity": 0.9, "start_step": 0, "end_step": 10, "pruning_frequency": 1,
                            "sparsity_decay_type": "exp"}, 2, "callbacks"
    if name == "patterns":
        return PATTERNS, {"target_sparsity": 0.8, "sparsity_decay_type": "cos", "excluded_op_names": ["downsample.*"],
                          "pruning_scope": "local", "min_sparsity_ratio_per_op": 0.1, "start_step": 1,
                          "end_step": 10}, 5, "callbacks"
    return CLASSIFIER, {"start_step": 0, "end_step": 4, "pruning_frequency": 2}, 1, \
        "prepare_pruning" if name == "prepare_pruning" else "callbacks"


def ours(entries):
    return [{**e, "pruning_type": "de_layerwise", "de_options": DE} for e in entries]


@pytest.mark.parametrize("kind", ["builtin", "ours"])
@pytest.mark.parametrize("name", ["basic", "schedulers", "patterns", "classifier", "prepare_pruning"])
def test_scenario(images, name, kind):
    model, eval_func = model_and_eval(images)
    entries, settings, epochs, route = scenario(name)
    if kind == "ours":
        entries = [{**e, "eval_func": eval_func} for e in ours(entries)]
    loop(model, WeightPruningConfig(entries, **settings), images, epochs, route)
    excluded = settings.get("excluded_op_names", [])
    for e in entries:
        selected = layers(model, e["op_names"][0].rstrip(".*"), excluded + e.get("excluded_op_names", []))
        mods = {n: m for n, m in selected.items() if fits(m, e["pattern"])}
        assert all(bool((m.weight != 0).all()) for n, m in selected.items() if n not in mods), "INC skips them"
        if not mods:
            continue  # upstream's basic layer3 5x1: no ResNet-18 layer3 conv has a multiple of 5 channels
        target = e.get("target_sparsity", settings.get("target_sparsity"))
        got = sparsity(mods)
        # block patterns round to whole blocks; INC's progressive types stop near the target
        tol = 0.01 if kind == "ours" else 0.1
        assert got == pytest.approx(target, abs=tol), (name, e["op_names"], got, target)
        if kind == "ours" and "min_sparsity_ratio_per_op" in settings:
            assert all(sparsity({n: m}) >= settings["min_sparsity_ratio_per_op"] - 1e-6 for n, m in mods.items())
    for n, m in model.named_modules():
        if any(e.rstrip(".*") in n for e in excluded) and isinstance(m, nn.Conv2d):
            assert bool((m.weight != 0).all()), f"{n} is excluded"
    assert bool((model.fc.weight != 0).all()), "INC leaves the classifier out"
