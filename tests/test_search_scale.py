"""Evaluation backends, resumable searches and their failure modes (issue: search at scale)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import de_plugin
from conftest import same_state, state_of
from de_plugin import checkpoint as ckpt
from de_plugin.weights.magnitude import MagnitudeScorer
from de_plugin.evaluation import WorkerError, make_backend
from de_plugin.targets import find_targets

SMALL = {"population": 6, "generations": 2, "rounds": 2, "finetune_epochs": 1, "scan_levels": [0.5, 0.8],
         "progress": False}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as each worker: bit-identical evaluations
    yield
    torch.set_num_threads(n)


def masks_of(r):
    return {k: v.clone() for k, v in r.masks.items()}


def same_masks(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_process_backend_gives_the_serial_masks(mlp, evaluate, finetune, one_thread):
    serial = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.8, seed=1, **SMALL)
    proc = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.8, seed=1,
                           backend="process", workers=2, **SMALL)
    assert same_masks(masks_of(serial), masks_of(proc)) and serial.nfev == proc.nfev
    assert [h["de"]["history"] for h in serial.history] == [h["de"]["history"] for h in proc.history]


def test_ray_backend_gives_the_serial_masks(mlp, evaluate, finetune, one_thread):
    pytest.importorskip("ray")
    # Ray workers unpickle the model: its class must be importable there (not defined in a test file)
    seq = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for dst, src in zip([seq[1], seq[3], seq[5]], [mlp.fc1, mlp.fc2, mlp.out]):
            dst.load_state_dict(src.state_dict())
    mlp = seq
    opts = dict(SMALL, rounds=1, generations=1)
    serial = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.7, seed=2, **opts)
    ray_r = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.7, seed=2,
                            backend="ray", workers=2, **opts)
    assert same_masks(masks_of(serial), masks_of(ray_r))


@pytest.mark.parametrize("low_memory", [False, True], ids=["ranks", "low_memory"])
def test_batched_backend_scores_like_serial(mlp, digits, low_memory):
    batches = [(digits.x_val[i:i + 100], digits.y_val[i:i + 100]) for i in range(0, 300, 100)]
    targets = find_targets(mlp)
    from de_plugin.metrics import accuracy
    from de_plugin.evaluation import evaluator_from_batches

    ev = evaluator_from_batches(batches, "accuracy")
    cands = [torch.tensor([t.numel // d for t in targets]).numpy() for d in (1, 2, 4, 10, 30)]
    serial = make_backend("serial", MagnitudeScorer(mlp, targets, ev))
    batched = make_backend("batched", MagnitudeScorer(mlp, targets, ev, low_memory=low_memory), val_batches=batches,
                           metric=accuracy)
    before = state_of(mlp)
    for b in (serial, batched):
        b.start_round()
    a, c = serial.evaluate(cands), batched.evaluate(cands)
    serial.end_round()
    batched.end_round()
    assert not batched.fallback and a == pytest.approx(c, abs=1e-9) and len(set(a)) > 1
    assert same_state(before, state_of(mlp))


def test_worker_evaluations_are_real_and_a_failing_worker_is_reported(mlp, evaluate):
    targets = find_targets(mlp)
    calls = {"n": 0}

    def flaky(model):
        if os.environ.get("DE_PLUGIN_FAIL_WORKER") and os.getpid() != parent:
            raise RuntimeError("boom in worker")
        return evaluate(model)

    parent = os.getpid()
    backend = make_backend("process", MagnitudeScorer(mlp, targets, flaky), workers=2)
    try:
        backend.start_round()
        full = [t.numel for t in targets]
        half = [t.numel // 2 for t in targets]
        got = backend.evaluate([full, half])
        # a worker's value is the real accuracy of the masked model, computed here the same way
        s = MagnitudeScorer(mlp, targets, evaluate)
        assert got == [s.score(full), s.score(half)]
        s.restore()
        calls["n"] += 1
    finally:
        backend.close()
    os.environ["DE_PLUGIN_FAIL_WORKER"] = "1"
    try:
        backend = make_backend("process", MagnitudeScorer(mlp, targets, flaky), workers=2)
        backend.start_round()
        with pytest.raises(WorkerError, match="boom in worker"):
            backend.evaluate([[t.numel for t in targets]])
    finally:
        os.environ.pop("DE_PLUGIN_FAIL_WORKER")
        backend.close()


def test_a_dead_worker_is_replaced_and_the_candidate_retried(mlp, evaluate):
    targets = find_targets(mlp)
    backend = make_backend("process", MagnitudeScorer(mlp, targets, evaluate), workers=2)
    try:
        backend.start_round()
        os.kill(backend.workers[0][1].pid, signal.SIGKILL)
        backend.workers[0][1].join()
        full = [t.numel for t in targets]
        assert backend.evaluate([full, full]) == [evaluate(mlp)] * 2
        assert all(p.is_alive() for _, p in backend.workers)
    finally:
        backend.close()


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import de_plugin
    from conftest import MLP
    from de_plugin.demo.data import load_digits_dataset
    from de_plugin.demo.training import make_finetune, train
    d = load_digits_dataset(val_size=300, test_size=300, seed=0)
    torch.manual_seed(0)
    model = train(MLP(), d.x_train, d.y_train, epochs=5, lr=3e-3, batch_size=64, seed=0)
    if {slow}:  # slow the search down so the kill lands mid-generation (no effect on results)
        model.register_forward_pre_hook(lambda m, a: time.sleep(0.004) if not m.training else None)
    val = [(d.x_val[i:i + 50], d.y_val[i:i + 50]) for i in range(0, 300, 50)]  # early rejection active
    r = de_plugin.prune(model, "de_layerwise", val_data=val, finetune=make_finetune(d.x_train, d.y_train, lr=1e-3,
                        batch_size=64), sparsity=0.85, seed=3, checkpoint={path!r}, resume={resume},
                        population=6, generations=4, rounds=2, finetune_epochs=1, scan_levels=[0.5, 0.8], progress=False)
    torch.save({{"masks": dict(r.masks), "de": [h["de"] for h in r.history]}}, {out!r})
""")


def run_script(tmp_path, name, path, resume, slow=False, wait=True):
    code = SCRIPT.format(tests=os.path.dirname(__file__), path=str(path), resume=resume,
                         out=str(tmp_path / f"{name}.pt"), slow=slow)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-3000:]
    return proc


def test_sigkill_mid_generation_then_resume_gives_the_uninterrupted_masks(tmp_path):
    run_script(tmp_path, "full", tmp_path / "full.ckpt", resume=False)
    path = tmp_path / "killed.ckpt"
    proc = run_script(tmp_path, "killed", path, resume=False, slow=True, wait=False)
    deadline = time.time() + 300
    # kill once the search is inside round 1's DE (a mid-round generation has been saved)
    while time.time() < deadline:
        if path.exists():
            try:
                state = torch.load(path, weights_only=False)
            except Exception:  # noqa: BLE001 - being replaced right now
                state = {}
            if state.get("round") == 1 and "search" in state and state["search"]["solver"]["nit"] >= 1:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.pt").exists()
    saved = torch.load(path, weights_only=False)
    assert saved["round"] == 1 and saved["search"]["solver"]["nit"] >= 1
    run_script(tmp_path, "killed", path, resume=True)
    full, resumed = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "killed.pt")
    assert same_masks(full["masks"], resumed["masks"])
    untimed = [[{k: v for k, v in d.items() if k != "selection_seconds"} for d in r["de"]] for r in (full, resumed)]
    assert untimed[0] == untimed[1]  # DE history, early-rejection counts and the selection carried across the kill
    assert sum(d["early_rejected"] for d in full["de"]) > 0


def test_checkpoint_bad_input_says_what_differs_and_overwrites_nothing(mlp, evaluate, finetune, tmp_path):
    path = tmp_path / "s.ckpt"
    opts = dict(SMALL, rounds=1, generations=1)
    de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.7, checkpoint=str(path), **opts)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="option population: checkpoint 6, now 8"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.7, checkpoint=str(path),
                        resume=True, **{**opts, "population": 8})
    with pytest.raises(ValueError, match="sparsity: checkpoint 0.7, now 0.8"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.8, checkpoint=str(path),
                        resume=True, **opts)
    assert path.read_bytes() == before
    (tmp_path / "cut.ckpt").write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.7,
                        checkpoint=str(tmp_path / "cut.ckpt"), resume=True, **opts)
    # a finished search resumes to the same result at once
    again = de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.7,
                            checkpoint=str(path), resume=True, **opts)
    assert abs(again.sparsity - 0.7) < 1e-3


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"workers": 0}, ValueError, "workers"),
    ({"resume": True}, ValueError, "resume=True needs checkpoint"),
])
def test_backend_bad_input(mlp, evaluate, finetune, kwargs, exc, match):
    before = state_of(mlp)
    with pytest.raises(exc, match=match):
        de_plugin.prune(mlp, "de_layerwise", evaluate=evaluate, finetune=finetune, sparsity=0.7, inplace=True,
                        **SMALL, **kwargs)
    assert same_state(before, state_of(mlp))


def test_ray_missing_says_how_to_install(mlp, evaluate, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"pip install 'de-plugin\[ray\]'"):
        make_backend("ray", MagnitudeScorer(mlp, find_targets(mlp), evaluate), workers=1)


def test_checkpoint_fingerprint_names_changed_layers():
    a = {"pruner": "de_layerwise", "targets": [["fc1.weight", [64, 64]]], "sparsity": 0.9, "max_accuracy_drop": None,
         "seed": 0, "options": {}}
    b = dict(a, targets=[["fc1.weight", [32, 64]]])
    assert ckpt.differences(a, b) == ["layer fc1.weight: checkpoint [64, 64], now [32, 64]"]


# ------------------------------------------------------------------------------ early rejection
def val_batches(digits, size=50):
    return [(digits.x_val[i:i + size], digits.y_val[i:i + size]) for i in range(0, len(digits.y_val), size)]


def test_scorer_rejects_only_candidates_below_their_floor_and_is_exact_otherwise(mlp, digits):
    from de_plugin.evaluation import Bound
    from de_plugin.metrics import accuracy
    from de_plugin.evaluation import evaluator_from_batches

    batches = val_batches(digits)
    ev = evaluator_from_batches(batches, "accuracy")
    targets = find_targets(mlp)
    scorer = MagnitudeScorer(mlp, targets, ev, batches, accuracy)
    before = state_of(mlp)
    cands = [[t.numel // d for t in targets] for d in (1, 3, 10, 40)]
    exact = [scorer.score(c) for c in cands]
    assert len(set(exact)) == len(exact)  # really different candidates
    rejected = 0
    for c, acc in zip(cands, exact):
        for floor in (acc - 0.05, acc, acc + 0.01, acc + 0.3, 2.0):
            v = scorer.score(c, floor)
            if isinstance(v, Bound):
                rejected += 1
                assert acc <= v < floor and 0 < v.images_left < len(digits.y_val)
            else:
                assert v == acc  # bit-identical to the plain evaluation
    scorer.restore()
    assert rejected >= 4 and same_state(before, state_of(mlp))
    # no bound without a per-image metric or with a single batch
    assert MagnitudeScorer(mlp, targets, ev, batches, None).batches is None
    assert MagnitudeScorer(mlp, targets, ev, batches[:1], accuracy).batches is None


@pytest.mark.parametrize("goal", [{"sparsity": 0.85}, {"max_accuracy_drop": 0.01}])
def test_early_rejection_keeps_the_masks_and_saves_work(mlp, digits, finetune, goal):
    opts = dict(SMALL, generations=4, population=8)
    runs = [de_plugin.prune(mlp, "de_layerwise", val_data=val_batches(digits), finetune=finetune, seed=3,
                            early_reject=er, **goal, **opts) for er in (False, True)]
    off, on = runs
    assert same_masks(masks_of(off), masks_of(on))
    assert [h["de"]["history"] for h in off.history] == [h["de"]["history"] for h in on.history]
    saved = sum(h["de"]["early_rejected"] + h["de"]["skipped"] for h in on.history)
    assert sum(h["de"]["early_rejected"] + h["de"]["skipped"] for h in off.history) == 0
    assert saved > 0 and on.nfev == off.nfev - sum(h["de"]["skipped"] for h in on.history)


def test_early_rejection_on_workers_gives_the_serial_masks(mlp, digits, finetune, one_thread):
    kw = dict(SMALL, rounds=1, generations=3, val_data=val_batches(digits), finetune=finetune, seed=4,
              max_accuracy_drop=0.01)
    serial = de_plugin.prune(mlp, "de_layerwise", **kw)
    proc = de_plugin.prune(mlp, "de_layerwise", backend="process", workers=2, **kw)
    assert same_masks(masks_of(serial), masks_of(proc))
    assert [h["de"] for h in serial.history] == [h["de"] for h in proc.history]
    assert serial.history[0]["de"]["early_rejected"] + serial.history[0]["de"]["skipped"] > 0


@pytest.mark.parametrize("low_memory", [False, True], ids=["ranks", "low_memory"])
def test_incremental_mask_application_equals_a_fresh_one(mlp, evaluate, low_memory):
    targets = find_targets(mlp)
    before = state_of(mlp)
    a = MagnitudeScorer(mlp, targets, evaluate, low_memory=low_memory)
    sequence = [[t.numel // d for t in targets] for d in (2, 7, 3, 3, 1, 50, 2)]
    for counts in sequence:
        a.apply(counts)  # incremental from the previous candidate
        got = [p.detach().clone() for p in a.params]
        fresh = MagnitudeScorer(mlp, targets, evaluate)  # the round's weights, as a just-restored scorer sees them
        fresh._w0, fresh.rank, fresh.params, fresh._keep, fresh._ready = a.w0, a.rank, a.params, a._keep, True
        fresh.restore()
        fresh.apply(counts)
        assert all(torch.equal(x, p) for x, p in zip(got, fresh.params))
        assert all(int((p != 0).sum()) <= k for p, k in zip(fresh.params, counts))
        fresh.applied = list(a.applied)  # both hold `counts` now
    a.restore()
    assert same_state(before, state_of(mlp))


def test_validation_batches_are_moved_to_a_device_once(digits):
    from de_plugin.evaluation import evaluator_from_batches

    ev = evaluator_from_batches(val_batches(digits), "accuracy")
    meta = torch.device("meta")  # stands in for an accelerator: tensors move there without data
    first, labels = ev.batches.on(meta)
    again, labels2 = ev.batches.on(meta)
    assert first is again and labels is labels2 and all(x.device == meta and y.device == meta for x, y in first)
    cpu, _ = ev.batches.on(torch.device("cpu"))
    assert all(a is b for (a, _), (b, _) in zip(cpu, ev.batches.batches))  # on the host: no copies at all
