"""A real Ray cluster on loopback (``ray start --head`` plus a second node): searches and coarse scoring
with ``backend="ray", ray_address=...`` give the serial masks; a model class the nodes cannot import
is refused with the fix; an address nobody answers at fails fast; a worker node killed mid-search is
survived. The README's scale-out recipe is the one started here."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray")
RAY = shutil.which("ray") or os.path.join(os.path.dirname(os.path.realpath(__import__("sys").executable)), "ray")
pytestmark = pytest.mark.skipif(not os.path.exists(RAY), reason="the `ray` command is not installed")

import de_plugin  # noqa: E402
from de_plugin.demo.training import make_evaluate  # noqa: E402

HERE = os.path.abspath(__file__)
OPTS = {"population": 6, "generations": 2, "rounds": 1, "finetune_epochs": 0, "scan_levels": [0.5, 0.8],
        "progress": False}


class TinyNet(nn.Module):
    """Defined in this test file: Ray's workers import it only if the file travels with the job."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cmd(*args, env, timeout=60):
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs) + a worker node (1 CPU) on 127.0.0.1, temp dirs short enough for Ray's sockets."""
    ray.shutdown()  # another test may have started a local Ray in this process
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60: the driver must agree with the cluster's auth mode
    port, head_dir, node_dir = free_port(), tempfile.mkdtemp(prefix="/tmp/rh"), tempfile.mkdtemp(prefix="/tmp/rn")
    try:
        r = ray_cmd("start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    f"--temp-dir={head_dir}", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = ray_cmd("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={node_dir}", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        yield {"address": f"127.0.0.1:{port}", "node_dir": node_dir}
    finally:
        ray.shutdown()
        ray_cmd("stop", "--force", env=env)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)


@pytest.fixture
def tiny(_trained):
    m = TinyNet()
    m.load_state_dict(_trained.state_dict())
    return m


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker runs one thread: bit-identical evaluations
    yield
    torch.set_num_threads(n)


def masks_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def on_cluster(cluster, **kw):
    return dict(backend="ray", workers=2, ray_address=cluster["address"],
                ray_runtime_env={"py_modules": [HERE]}, **kw)


def test_de_layerwise_on_the_cluster_gives_the_serial_masks(cluster, tiny, evaluate, one_thread):
    serial = de_plugin.prune(tiny, "de_layerwise", evaluate=evaluate, sparsity=0.7, seed=2, **OPTS)
    try:
        par = de_plugin.prune(tiny, "de_layerwise", evaluate=evaluate, sparsity=0.7, seed=2, **on_cluster(cluster),
                              **OPTS)
    finally:
        ray.shutdown()
    assert masks_equal(serial.masks, par.masks) and serial.nfev == par.nfev
    where = par.extra["ray_workers"]
    assert where["workers"] == 2 and len(where["nodes"]) == 2  # one actor on each node (SPREAD)


def test_random_coarse_scoring_on_the_cluster_is_the_serial_scoring(cluster, resnet, images, one_thread):
    ev = make_evaluate(images.xv, images.yv)
    kw = dict(evaluate=ev, train_data=images.batches, feature_map_ratio=0.5, candidates=4, bn_batches=2,
              finetune_epochs=0, progress=False, seed=5)
    serial = de_plugin.prune(resnet, "random_coarse", **kw)
    try:
        par = de_plugin.prune(resnet, "random_coarse", backend="ray", workers=2, ray_address=cluster["address"], **kw)
    finally:
        ray.shutdown()
    assert serial.extra["candidate_scores"] == par.extra["candidate_scores"]
    assert masks_equal(serial.masks, par.masks)


def test_a_model_the_nodes_cannot_import_is_refused_with_the_fix(cluster, tiny, evaluate):
    try:
        with pytest.raises(ImportError, match=r"cannot import 'test_ray_cluster'.*ray_runtime_env=\{'py_modules'"):
            de_plugin.prune(tiny, "de_layerwise", evaluate=evaluate, sparsity=0.7, backend="ray", workers=1,
                            ray_address=cluster["address"], **OPTS)
    finally:
        ray.shutdown()


def test_an_address_nobody_answers_at_fails_fast(tiny, evaluate):
    ray.shutdown()
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"no Ray cluster answered at ray_address='127.0.0.1:\d+'"):
        de_plugin.prune(tiny, "de_layerwise", evaluate=evaluate, sparsity=0.7, backend="ray",
                        ray_address=f"127.0.0.1:{free_port()}", **OPTS)
    assert time.perf_counter() - t0 < 5  # what README promises


class _CudaLooking:
    """A scorer whose model says it is on CUDA (this machine has none): what RayBackend checks."""

    class _P:
        is_cuda = True

    class _M:
        def parameters(self):
            return iter([_CudaLooking._P()])

    model = _M()


def test_cuda_on_a_cluster_without_gpus_is_refused(cluster):
    from de_plugin.evaluation import make_backend

    try:
        with pytest.raises(ValueError, match="model is on CUDA but the Ray cluster has no GPU"):
            make_backend("ray", _CudaLooking(), workers=1, address=cluster["address"])
    finally:
        ray.shutdown()


def test_a_ray_version_mismatch_is_said_plainly(cluster, monkeypatch):
    from de_plugin.evaluation import make_backend

    def mismatch(*a, **k):
        raise RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.9.0\n    Python: 3.10.0\n"
                           "This process on node 127.0.0.1 was started with:\n    Ray: 2.60.0")

    ray.shutdown()
    monkeypatch.setattr(ray, "init", mismatch)
    with pytest.raises(RuntimeError, match=r"runs another Ray or Python version than this process .*Ray said: "
                                           r"Version mismatch"):
        make_backend("ray", _CudaLooking(), workers=1, address=cluster["address"])


def raylet_of(node_dir: str) -> int:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in out.splitlines()
            if len(line.split()) > 1 and os.path.basename(line.split()[1]) == "raylet" and node_dir in line]
    assert pids, f"no raylet of the worker node (temp dir {node_dir}) found"
    return pids[0]


def test_a_worker_node_killed_mid_search_is_survived(cluster, tiny, evaluate, one_thread):
    """Last in the module: it takes the second node down from inside the search (the worker running
    there kills its node's raylet and itself on its third evaluation), so the kill lands mid-search."""
    pid = raylet_of(cluster["node_dir"])

    def kills_its_node(m, calls=[0]):  # noqa: B006 - per-worker call counter (each actor holds its copy)
        calls[0] += 1
        if calls[0] == 3 and os.getppid() == pid:  # Ray workers are children of their node's raylet
            os.kill(pid, signal.SIGKILL)  # the node goes down with everything on it: its raylet ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... and this worker (an orphan would serve on until Ray notices)
        return evaluate(m)

    opts = dict(OPTS, generations=4)
    serial = de_plugin.prune(tiny, "de_layerwise", evaluate=evaluate, sparsity=0.7, seed=3, **opts)
    try:
        par = de_plugin.prune(tiny, "de_layerwise", evaluate=kills_its_node, sparsity=0.7, seed=3,
                              **on_cluster(cluster), **opts)
    finally:
        ray.shutdown()
    assert par.extra["ray_workers"]["workers"] == 1  # the dead node's worker left the pool
    assert not alive(pid)  # its raylet is gone (a zombie where nobody reaps it)
    assert masks_equal(serial.masks, par.masks) and serial.nfev == par.nfev


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
