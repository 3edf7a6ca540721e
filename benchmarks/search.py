"""How fast de_layerwise evaluates candidates, per backend (Fashion-MNIST, LeNet-300-100 / LeNet-5).

All numbers are ratios measured in one run on the same machine:

* floor: per-candidate time of ``serial`` against one plain dense forward pass over the same
  validation split (masks applied in place, scored, restored; no copies);
* ``batched`` (vmap over stacked masked weights) against ``serial``, and how often a short
  de_layerwise search with ``batched`` ends with other masks than with ``serial``;
* ``process`` and ``ray`` with 2 workers of 1 thread each against ``serial`` using both cores'
  threads (the honest baseline on a 2-core machine), on a batch of candidates like one DE generation;
* the ceiling for 2 workers x 1 thread: 2 x (serial at 2 threads) / (serial at 1 thread); when
  intra-op threading already scales well, no worker pool can beat it on the same two cores;
* early rejection: one DE round with ``early_reject`` off and on (budget and accuracy forms), the
  speed-up, whether the masks are the same, and how many trials were stopped early or skipped;
* the share of a full de_layerwise run spent searching vs fine-tuning;
* ``--parts sweep``: ``process`` and ``ray`` at ``--workers`` 1, 2, 4, ... (1 thread each) against
  ``serial`` using every core's threads, on ``--sweep-candidates`` candidates (a large DE generation);
  ``--ray-address`` runs the ray column on a cluster (``ray start --head``), ``--device cuda`` adds
  ``batched`` on the GPU against ``serial`` on the GPU;
* ``--coarse-models``: random_coarse's best-of-N scoring (adaptive BN on, 256 validation images
  per candidate as in benchmarks/coarse.py) on ``process`` / ``ray`` against ``serial``, and
  whether the candidate scores are bit-identical when serial also runs at 1 thread.

    python benchmarks/search.py --out benchmarks/results/search
    python benchmarks/search.py --parts sweep --models lenet5 --workers 1 2 --out benchmarks/results/search_sweep
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import de_plugin
from de_plugin.demo.training import dense_model
from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset
from de_plugin.weights.magnitude import MagnitudeScorer
from de_plugin.evaluation import make_backend
from de_plugin.metrics import accuracy
from de_plugin.evaluation import evaluator_from_batches
from de_plugin.targets import find_targets
from de_plugin.demo.training import make_evaluate, make_finetune

log = logging.getLogger("search")


def candidates(targets, n, rng):
    """Random keep-count vectors between 2% and 100% density per layer."""
    return [np.array([int(t.numel * rng.uniform(0.02, 1.0)) for t in targets]) for _ in range(n)]


def per_candidate(backend, cands, repeats):
    backend.start_round()
    backend.evaluate(cands[:2])  # warm up (and workers' first batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.evaluate(cands)
        times.append((time.perf_counter() - t0) / len(cands))
    backend.end_round()
    return statistics.median(times)


def dense_forward(model, batches, repeats):
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for x, _ in batches:
                model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def floor_ratio(model, batches, backend, cands, repeats):
    """Per-candidate serial time over the dense forward pass, measured alternately (the two
    drift together on a shared machine), median of the repeats."""
    backend.start_round()
    backend.evaluate(cands[:2])
    ratios = []
    for _ in range(repeats):
        floor = dense_forward(model, batches, 3)
        t0 = time.perf_counter()
        backend.evaluate(cands)
        ratios.append((time.perf_counter() - t0) / len(cands) / floor)
    backend.end_round()
    return statistics.median(ratios)


def setup(name, args, data, n):
    """The dense model, its validation batches and evaluator, targets and ``n`` random candidates."""
    model = dense_model(name, data, args.dense_epochs[name], 0, args.data)
    bs = args.val_batch
    batches = [(data.x_val[i:i + bs], data.y_val[i:i + bs]) for i in range(0, args.val, bs)]
    ev = evaluator_from_batches(batches, "accuracy")
    targets = find_targets(model)
    return model, batches, ev, targets, candidates(targets, n, np.random.default_rng(0))


def run_model(name, args, data):
    model, batches, ev, targets, cands = setup(name, args, data, args.candidates)
    out = {"model": name, "val_images": args.val, "candidates": len(cands)}
    torch.set_num_threads(1)
    out["serial_1thread_s"] = per_candidate(make_backend("serial", MagnitudeScorer(model, targets, ev)), cands, args.repeats)
    torch.set_num_threads(2)
    out["dense_forward_s"] = dense_forward(model, batches, args.repeats)
    out["serial_over_floor"] = floor_ratio(model, batches, make_backend("serial", MagnitudeScorer(model, targets, ev)), cands,
                                           2 * args.repeats)
    out["serial_s"] = per_candidate(make_backend("serial", MagnitudeScorer(model, targets, ev)), cands, args.repeats)
    b = make_backend("batched", MagnitudeScorer(model, targets, ev), val_batches=batches, metric=accuracy)
    out["batched_s"] = per_candidate(b, cands, args.repeats)
    out["batched_fell_back"] = bool(getattr(b, "fallback", True))
    for kind in ("process", "ray"):
        backend = make_backend(kind, MagnitudeScorer(model, targets, ev), workers=2, threads=1)
        try:
            out[f"{kind}_s"] = per_candidate(backend, cands, args.repeats)
        finally:
            backend.close()
    torch.set_num_threads(2)
    # batched vs serial: do the chosen masks differ after a short search?
    differ = 0
    for seed in args.seeds:
        kw = dict(sparsity=0.95, seed=seed, rounds=1, finetune_epochs=0, population=10, generations=3, progress=False)
        a = de_plugin.prune(model, "de_layerwise", val_data=batches, **kw)
        c = de_plugin.prune(model, "de_layerwise", val_data=batches, backend="batched", **kw)
        differ += int(any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks))
    out["batched_masks_differ"] = f"{differ}/{len(args.seeds)}"
    # where a full pipeline spends its time
    ft = make_finetune(data.x_train, data.y_train, lr=5e-4)
    r = de_plugin.prune(model, "de_layerwise", val_data=batches, finetune=ft, sparsity=0.95, rounds=2,
                        finetune_epochs=1, population=12, generations=6, progress=False)
    search = sum(h.get("search_seconds", 0.0) for h in r.history)
    tune = sum(h.get("finetune_seconds", 0.0) for h in r.history)
    out.update({"pipeline_s": r.wall_time, "search_share": search / r.wall_time, "finetune_share": tune / r.wall_time,
                "pipeline_nfev": r.nfev})
    return out


def run_sweep(name, args, data):
    """Per-candidate seconds of process / ray at each worker count against serial on all threads."""
    import os

    model, batches, ev, targets, cands = setup(name, args, data, args.sweep_candidates)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    out = {"model": name, "cores": cores, "candidates": len(cands), "val_images": args.val,
           "serial_s": per_candidate(make_backend("serial", MagnitudeScorer(model, targets, ev)), cands, args.repeats)}
    torch.set_num_threads(1)
    out["serial_1thread_s"] = per_candidate(make_backend("serial", MagnitudeScorer(model, targets, ev)), cands,
                                            args.repeats)
    torch.set_num_threads(cores)
    for kind in ("process", "ray"):
        for w in args.workers:
            backend = make_backend(kind, MagnitudeScorer(model, targets, ev), workers=w, threads=1,
                                   address=args.ray_address if kind == "ray" else None)
            try:
                out[f"{kind}_{w}_s"] = per_candidate(backend, cands, args.repeats)
            finally:
                backend.close()
            log.info("%s %s x%d: %.4f s per candidate", name, kind, w, out[f"{kind}_{w}_s"])
    if args.device != "cpu":
        gpu = model.to(args.device)
        gb = [(x.to(args.device), y.to(args.device)) for x, y in batches]
        gev = evaluator_from_batches(gb, "accuracy")
        out["gpu_serial_s"] = per_candidate(make_backend("serial", MagnitudeScorer(gpu, targets, gev)), cands, args.repeats)
        b = make_backend("batched", MagnitudeScorer(gpu, targets, gev), val_batches=gb, metric=accuracy)
        out["gpu_batched_s"] = per_candidate(b, cands, args.repeats)
    return out


def sweep_table(rows, workers):
    head = f"{'model':9s} {'cores':>5s} {'serial s/cand':>13s} " + " ".join(
        f"{k + ' x' + str(w):>11s}" for k in ("process", "ray") for w in workers) + f" {'ceiling x' + str(max(workers)):>11s}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['model']:9s} {r['cores']:5d} {r['serial_s']:13.5f} " + " ".join(
            f"{r['serial_s'] / r[f'{k}_{w}_s']:11.2f}" for k in ("process", "ray") for w in workers)
                     + f" {min(max(workers), r['cores']) * r['serial_s'] / r['serial_1thread_s']:11.2f}")
        if "gpu_batched_s" in r:
            lines.append(f"{'':9s} GPU: serial {r['gpu_serial_s']:.5f} s/cand, batched {r['gpu_batched_s']:.5f} s/cand "
                         f"({r['gpu_serial_s'] / r['gpu_batched_s']:.2f}x)")
    lines.append("process/ray xN = speed-up against serial using every core's threads, N workers of 1 thread each; "
                 f"the ceiling for N <= {rows[0]['cores'] if rows else '?'} cores is N x (serial at all threads) / (serial at 1 thread)")
    return "\n".join(lines)


def run_reject(name, args, data):
    """The same DE round with early_reject off and on, alternated ``--reject-repeats`` times."""
    model = dense_model(name, data, args.dense_epochs[name], 0, args.data)
    bs = args.val_batch
    batches = [(data.x_val[i:i + bs], data.y_val[i:i + bs]) for i in range(0, args.val, bs)]
    torch.set_num_threads(2)
    out = {"model": name}
    for form, goal in (("budget", {"sparsity": 0.95}), ("accuracy", {"max_accuracy_drop": 0.01})):
        times, runs = {False: [], True: []}, {}
        for rep in range(args.reject_repeats):
            for er in ((False, True) if rep % 2 == 0 else (True, False)):
                kw = dict(seed=0, rounds=1, finetune_epochs=0, population=12, generations=8, progress=False)
                t0 = time.perf_counter()
                runs[er] = de_plugin.prune(model, "de_layerwise", val_data=batches, early_reject=er, **goal, **kw)
                times[er].append(time.perf_counter() - t0)
        off, on = runs[False], runs[True]
        de = on.history[0]["de"]
        out[form] = {
            "speedup": statistics.median(times[False]) / statistics.median(times[True]), "times": times,
            "same_masks": all(torch.equal(off.masks[k], on.masks[k]) for k in off.masks),
            "trials": de["nit"] * 12,  # generations after the initial population, one trial per member
            "rejected": de["early_rejected"], "skipped": de["skipped"],
            "images_saved_share": (de["images_saved"] + de["skipped"] * args.val) / (off.nfev * args.val)}
    return out


def reject_table(rows):
    lines = [f"{'model':9s} {'goal':9s} {'early reject x':>14s} {'same masks':>10s} {'trials':>6s} "
             f"{'rejected':>8s} {'skipped':>7s} {'images saved %':>14s}"]
    for r in rows:
        for form in ("budget", "accuracy"):
            e = r[form]
            lines.append(f"{r['model']:9s} {form:9s} {e['speedup']:14.2f} {str(e['same_masks']):>10s} {e['trials']:6d} "
                         f"{e['rejected']:8d} {e['skipped']:7d} {100 * e['images_saved_share']:14.1f}")
    lines.append("early reject x: median wall time of one DE round (population 12, 8 generations) without / with "
                 "early_reject, runs alternated")
    return "\n".join(lines)


def run_coarse(name, args, data):
    model = dense_model(name, data, 4, 0, args.data)  # the dense models of benchmarks/coarse.py
    ev = make_evaluate(data.x_val[:256], data.y_val[:256])
    calib = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, 64 * 4, 64)]
    kw = dict(evaluate=ev, train_data=calib, feature_map_ratio=0.5, candidates=args.coarse_candidates, bn_batches=4,
              finetune_epochs=0, progress=False, seed=0)
    out = {"model": name, "candidates": args.coarse_candidates}
    # start Ray once outside the timing (a running cluster is the use case; its start-up is ~10 s)
    de_plugin.prune(model, "random_coarse", **dict(kw, candidates=2), backend="ray", workers=2)
    runs = {}
    for label, threads, extra in (("serial", 2, {}), ("serial_1thread", 1, {}),
                                  ("process", 2, {"backend": "process", "workers": 2}),
                                  ("ray", 2, {"backend": "ray", "workers": 2})):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        runs[label] = de_plugin.prune(model, "random_coarse", **kw, **extra)
        out[f"{label}_s"] = time.perf_counter() - t0
    torch.set_num_threads(2)
    ref = runs["serial_1thread"].extra["candidate_scores"]
    out["same_scores"] = {k: runs[k].extra["candidate_scores"] == ref for k in ("process", "ray")}
    return out


def coarse_table(rows):
    lines = [f"{'model':9s} {'N':>4s} {'serial s':>8s} {'process x':>9s} {'ray x':>7s} {'2-thr scaling':>13s} "
             f"{'scores = serial@1thr':>21s}"]
    for r in rows:
        same = "/".join("yes" if r["same_scores"][k] else "no" for k in ("process", "ray"))
        lines.append(f"{r['model']:9s} {r['candidates']:4d} {r['serial_s']:8.1f} {r['serial_s'] / r['process_s']:9.2f} "
                     f"{r['serial_s'] / r['ray_s']:7.2f} {r['serial_1thread_s'] / r['serial_s']:13.2f} {same:>21s}")
    lines.append("random_coarse best-of-N (adaptive BN): x = speed-up against serial at 2 threads; "
                 "process/ray 2 workers x 1 thread (times include starting the workers, not Ray itself)")
    return "\n".join(lines)


def table(rows):
    lines = [f"{'model':9s} {'serial/floor':>12s} {'batched x':>9s} {'process x':>9s} {'ray x':>7s} "
             f"{'2-thr scaling':>13s} {'ceiling x':>9s} {'batched masks differ':>21s} {'search %':>8s} "
             f"{'fine-tune %':>11s}"]
    for r in rows:
        lines.append(f"{r['model']:9s} {r['serial_over_floor']:12.3f} {r['serial_s'] / r['batched_s']:9.2f} "
                     f"{r['serial_s'] / r['process_s']:9.2f} {r['serial_s'] / r['ray_s']:7.2f} "
                     f"{r['serial_1thread_s'] / r['serial_s']:13.2f} {2 * r['serial_s'] / r['serial_1thread_s']:9.2f} "
                     f"{r['batched_masks_differ']:>21s} {100 * r['search_share']:8.1f} {100 * r['finetune_share']:11.1f}")
    lines.append("x = speed-up against serial (serial: 2 threads; process/ray: 2 workers x 1 thread); "
                 "ceiling = best possible process x = 2 / (2-thread scaling)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["backends", "reject", "coarse"],
                    choices=["backends", "reject", "coarse", "sweep"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="sweep: worker counts (1 2 4 8 16)")
    ap.add_argument("--sweep-candidates", type=int, default=64, help="sweep: candidates per timed batch")
    ap.add_argument("--ray-address", default=None, help="sweep: run the ray column on this cluster")
    ap.add_argument("--device", default="cpu", help="sweep: also time serial and batched on this device")
    ap.add_argument("--models", nargs="*", default=["lenet300", "lenet5"])
    ap.add_argument("--reject-repeats", type=int, default=3)
    ap.add_argument("--coarse-models", nargs="*", default=["vgg"], help="random_coarse scoring on the backends")
    ap.add_argument("--coarse-candidates", type=int, default=96)
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--val", type=int, default=2000, help="validation images per evaluation")
    ap.add_argument("--val-batch", type=int, default=250, help="images per validation batch (rejection granularity)")
    ap.add_argument("--candidates", type=int, default=40, help="candidates per timed batch (a DE generation)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/search")
    args = ap.parse_args()
    args.dense_epochs = {"lenet300": 5, "lenet5": 3}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load_idx_dataset(args.data, val_size=5000, train_limit=20000, seed=0)
    rows = [run_model(m, args, data) for m in args.models] if "backends" in args.parts else []
    reject = [run_reject(m, args, data) for m in args.models] if "reject" in args.parts else []
    coarse = [run_coarse(m, args, data) for m in args.coarse_models] if "coarse" in args.parts else []
    sweep = [run_sweep(m, args, data) for m in args.models] if "sweep" in args.parts else []
    text = "\n\n".join(([table(rows)] if rows else []) + ([reject_table(reject)] if reject else [])
                        + ([coarse_table(coarse)] if coarse else []) + ([sweep_table(sweep, args.workers)] if sweep else []))
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows,
                                                        "reject": reject, "coarse": coarse, "sweep": sweep}, indent=1))


if __name__ == "__main__":
    main()
