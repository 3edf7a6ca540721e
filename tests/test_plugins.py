"""A real plugin distribution, built and installed with pip, adds a pruner through the entry point."""
import json
import os
import subprocess
import sys
import textwrap

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
    print(json.dumps({"pruners": de_plugin.list_pruners(), "metrics": de_plugin.list_metrics(),
                      "sparsity": r.sparsity, "info": r.history[-1].get("from_plugin")}))
    """
)


def test_installed_plugin_is_listed_and_used(tmp_path):
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "example_random" in res["pruners"] and "de_layerwise" in res["pruners"]
    assert "example_top2" in res["metrics"]
    assert abs(res["sparsity"] - 0.75) < 1e-3
    assert res["info"] is True
    # without the plugin on the path it is not listed
    clean = subprocess.run([sys.executable, "-c", "import de_plugin; print(de_plugin.list_pruners())"],
                           check=True, capture_output=True, text=True)
    assert "example_random" not in clean.stdout
