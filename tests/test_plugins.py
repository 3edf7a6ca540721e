"""A real plugin distribution, built and installed with pip, adds a pruner through the entry point."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN_SETUP = textwrap.dedent(
    """
    [build-system]
    requires = ["setuptools>=64"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "de-plugin-example-random"
    version = "0.0.1"

    [project.entry-points.de_plugin]
    random_prune = "de_plugin_example_random"
    """
)
PLUGIN_CODE = textwrap.dedent(
    '''
    """Example third-party plugin: prunes a random subset of weights in each layer."""
    import numpy as np
    from de_plugin.hookspecs import hookimpl
    from de_plugin import IterativePruner


    class RandomShare(IterativePruner):
        name = "example_random"

        def allocate(self, state, keep, round_index):
            counts = np.floor(state.numels * keep / state.total).astype(np.int64)
            counts[0] += keep - counts.sum()
            return counts, {"from_plugin": True}


    @hookimpl
    def register_pruners():
        return [RandomShare]


    def first_heavy(weights, sparsity, ranks=None):
        """Twice the density in the first layer as in the others, the budget exact."""
        n = np.array([w.numel() for w in weights])
        keep = int(round(n.sum() * (1.0 - sparsity)))
        d = np.ones(len(n))
        d[0] = 2.0
        counts = np.floor(d * n * keep / float((d * n).sum())).astype(np.int64)
        counts[-1] += keep - counts.sum()
        return counts


    @hookimpl
    def register_allocations():
        return {"example_first_heavy": first_heavy}


    @hookimpl
    def register_fitness_metrics():
        return {"example_top2": lambda out, y: float((out.topk(2, 1).indices == y[:, None]).any(1).float().mean())}
    '''
)
CHECK = textwrap.dedent(
    """
    import json, torch, de_plugin
    from torch import nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    r = de_plugin.prune(m, "example_random", sparsity=0.75, progress=False)
    # the plugin's allocation: a baseline pruner of its own name, and a seed of de_layerwise's search
    a = de_plugin.prune(m, "example_first_heavy", sparsity=0.75, rounds=1, progress=False)
    x, y = torch.randn(1000, 16), torch.randint(0, 4, (1000,))
    d = de_plugin.prune(m, "de_layerwise", val_data=[(x[i:i + 250], y[i:i + 250]) for i in range(0, 1000, 250)],
                        sparsity=0.75, rounds=1, population=6, generations=1, progress=False)
    print(json.dumps({"pruners": de_plugin.list_pruners(), "metrics": de_plugin.list_metrics(),
                      "sparsity": r.sparsity, "info": r.history[-1].get("from_plugin"),
                      "first_heavy": [row["kept"] for row in a.layers],
                      "seeds": sorted({s["source"] for s in d.history[0]["de"]["selection"]})}))
    """
)


# the plugin's pruner selected by name in an NNI config_list run, with an NNI TorchEvaluator
CHECK_NNI = textwrap.dedent(
    """
    import json, nni, torch, torch.nn.functional as F
    from nni.compression import TorchEvaluator
    from sklearn.datasets import load_digits
    from torch import nn
    import de_plugin_nni
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        for i in range(0, 1200, 64):
            optimizers.zero_grad()
            training_step((x[i:i + 64], y[i:i + 64]), model).backward()
            optimizers.step()

    def evaluate(model):
        with torch.no_grad():
            return float((model(x[1200:]).argmax(1) == y[1200:]).float().mean())

    ev = TorchEvaluator(training_func, nni.trace(torch.optim.Adam)(model.parameters(), lr=1e-2),
                        lambda b, m: F.cross_entropy(m(b[0]), b[1]), evaluating_func=evaluate, dummy_input=x[:2])
    pruner = de_plugin_nni.create_pruner("example_random", model, [{"op_types": ["Linear"], "sparse_ratio": 0.75}],
                                         ev, rounds=2, finetune_epochs=1)
    _, masks = pruner.compress()
    kept = sum(int(m["weight"].sum()) for m in masks.values())
    total = sum(m["weight"].numel() for m in masks.values())
    pruner.unwrap_model()
    zero = all(bool((model.get_submodule(n).weight[m["weight"] == 0] == 0).all()) for n, m in masks.items())
    print(json.dumps({"names": de_plugin_nni.list_pruners(), "sparsity": 1 - kept / total, "layers": sorted(masks),
                      "masked_zero": zero, "info": pruner.results[0].history[-1].get("from_plugin")}))
    """
)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """The example plugin built and installed with pip into its own folder; the environment that sees it."""
    tmp_path = tmp_path_factory.mktemp("plugin")
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PLUGIN_SETUP)
    (src / "de_plugin_example_random.py").write_text(PLUGIN_CODE)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        check=True,
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_installed_plugin_is_listed_and_used(plugin_env):
    env = plugin_env
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "example_random" in res["pruners"] and "de_layerwise" in res["pruners"]
    assert "example_top2" in res["metrics"]
    assert abs(res["sparsity"] - 0.75) < 1e-3
    assert res["info"] is True
    assert "example_first_heavy" in res["pruners"] and res["first_heavy"] == [142, 18]  # 2:1 densities of 512, 128
    assert "example_first_heavy" in res["seeds"] and "lamp" in res["seeds"]
    # without the plugin on the path it is not listed
    clean = subprocess.run([sys.executable, "-c", "import de_plugin; print(de_plugin.list_pruners())"],
                           check=True, capture_output=True, text=True)
    assert "example_random" not in clean.stdout


def test_installed_plugin_is_an_nni_pruner(plugin_env):
    """NNI's names come from the core registry: the plugin's pruner runs from an NNI config_list."""
    pytest.importorskip("nni")
    out = subprocess.run([sys.executable, "-c", CHECK_NNI], env=plugin_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "example_random" in res["names"] and "level" in res["names"] and "lamp" in res["names"]
    assert res["layers"] == ["0", "2"]
    assert abs(res["sparsity"] - 0.75) < 1e-3
    assert res["masked_zero"] and res["info"] is True
