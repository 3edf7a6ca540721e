"""random_coarse against L1-norm filter pruning and a single random mask (Fashion-MNIST), one run.

For each model (ResNet-style with residual adds + BatchNorm, VGG-style with BatchNorm) and each
MACs level (30/50/70% removed) we find the uniform feature-map ratio that removes that share of
MACs, draw ONE stream of random candidate masks at that ratio and score every candidate on a
validation subset twice: after adaptive BatchNorm (EagleEye) and with the stored statistics. Best-of-N
is then read as the running maximum over random orders of that stream (score vs N), and each seed's
``random_coarse`` mask is the best of its own random order's first N candidates. Every method's mask
is retrained with the same optimiser for the same number of gradient steps, then test accuracy,
MACs, parameters and the measured CPU latency of the NNI-sped-up model (median of repeated runs,
batch 1 and 64) are reported against the dense model.

    python benchmarks/coarse.py --out benchmarks/results/coarse
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from de_plugin.demo.training import dense_model
from de_plugin.channels.coarse import (CoarseOptions, CoarseSpace, InPlaceMasks, apply_and_retrain, count_macs, recalibrate_bn)
from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset
from de_plugin.demo.training import make_evaluate, make_finetune

LEVELS = [0.3, 0.5, 0.7]
NS = [1, 10, 30, 100, 300]
METHODS = ["random_coarse", "random_coarse_no_bn", "l1_filter", "single_random"]
log = logging.getLogger("coarse")


def conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def ratio_for_macs(model, example, level):
    """Uniform feature-map ratio whose masks remove ``level`` of the MACs (bisection; counts only)."""
    lo, hi = 0.0, 0.95
    rng = np.random.default_rng(0)
    for _ in range(30):
        mid = (lo + hi) / 2
        space = CoarseSpace(model, example, conv_names(model), CoarseOptions(feature_map_ratio=mid))
        m = count_macs(model, example, space.masks(space.sample(rng)))
        if 1 - m["macs"] / m["macs_dense"] < level:
            lo = mid
        else:
            hi = mid
    return hi


def latency(model, x, repeats):
    model.eval()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def own_masks(space, cand):
    from de_plugin_nni.coarse import own_masks as nni_own_masks

    return nni_own_masks(space, cand)


def sped_up(model, masks, example):
    import de_plugin_nni

    small = copy.deepcopy(model)
    nni_masks = {n.rsplit(".", 1)[0]: {"weight": m.float()} for n, m in masks.items()}
    de_plugin_nni.speedup(small, example, nni_masks)
    return small


def best_of_n_curve(scores, ns, orders):
    """Expected best-of-N (mean and spread over random orders of one scored stream)."""
    out = {}
    for n in ns:
        vals = [max(scores[o[:n]]) for o in orders]
        out[n] = (float(np.mean(vals)), float(np.std(vals)))
    return out


def dense_reference(dense, data, args, test):
    """The dense model given the same retraining budget (it is undertrained): per seed test accuracy."""
    out = []
    for seed in args.seeds:
        model = copy.deepcopy(dense)
        torch.manual_seed(seed)
        make_finetune(data.x_train[: args.ft_limit], data.y_train[: args.ft_limit], lr=5e-4, max_steps=args.steps)(model, 1)
        out.append(test(model))
    return out


def run_model(name, args, data):
    dense = dense_model(name, data, args.dense_epochs, 0, args.data)
    dense.eval()
    example = data.x_val[:2]
    val = make_evaluate(data.x_val[: args.search_val], data.y_val[: args.search_val])
    test = make_evaluate(data.x_test, data.y_test)
    calib = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, 64 * args.bn_batches, 64)]
    dense_test = test(dense)
    m0 = count_macs(dense, example)
    x1, x64 = data.x_test[:1], data.x_test[:64]
    torch.set_num_threads(args.threads)
    lat_dense = {"b1": latency(dense, x1, args.repeats), "b64": latency(dense, x64, max(5, args.repeats // 5))}
    out = {"model": name, "dense_test": dense_test, "dense_retrained_test": dense_reference(dense, data, args, test), "macs_dense": m0["macs_dense"], "params_dense": m0["params_dense"],
           "latency_dense": lat_dense, "levels": []}
    log.info("%s: dense test %.4f, %d MACs, %d params", name, dense_test, m0["macs_dense"], m0["params_dense"])
    for level in LEVELS:
        ratio = ratio_for_macs(dense, example, level)
        work = copy.deepcopy(dense)
        opts = CoarseOptions(feature_map_ratio=ratio, bn_batches=args.bn_batches, finetune_epochs=1)
        space = CoarseSpace(work, example, conv_names(work), opts)
        rng = np.random.default_rng(int(level * 1000))
        stream = [space.sample(rng) for _ in range(args.stream)]
        working = InPlaceMasks(work, space)
        s_bn, s_plain = np.zeros(len(stream)), np.zeros(len(stream))
        t0 = time.perf_counter()
        for i, cand in enumerate(stream):
            with working.applied(space.masks(cand)):
                s_plain[i] = val(work)
                recalibrate_bn(work, calib, args.bn_batches)
                s_bn[i] = val(work)
        score_s = time.perf_counter() - t0
        l1 = space.sample(rng, "l1")
        with working.applied(space.masks(l1)):
            recalibrate_bn(work, calib, args.bn_batches)
            l1_score = val(work)
        orders = [np.random.default_rng(100 + k).permutation(len(stream)) for k in range(args.orders)]
        curve_bn = best_of_n_curve(s_bn, [n for n in NS if n <= len(stream)], orders)
        curve_plain = best_of_n_curve(s_plain, [n for n in NS if n <= len(stream)], orders)
        runs = {m: [] for m in METHODS}
        lat = None
        for seed in args.seeds:
            order = np.random.default_rng(seed).permutation(len(stream))[: args.n]
            picks = {"random_coarse": stream[order[np.argmax(s_bn[order])]],
                     "random_coarse_no_bn": stream[order[np.argmax(s_plain[order])]],
                     "l1_filter": l1, "single_random": stream[order[0]]}
            for method, cand in picks.items():
                model = copy.deepcopy(dense)
                masks = space.masks(cand)
                ft = make_finetune(data.x_train[: args.ft_limit], data.y_train[: args.ft_limit], lr=5e-4,
                                   max_steps=args.steps)
                space_m = CoarseSpace(model, example, conv_names(model), opts)  # same groups, same order
                apply_and_retrain(model, space_m, masks, ft, opts, seed, calib)
                macs = count_macs(model, example, masks)
                row = {"seed": seed, "test": test(model), "steps": ft.steps, "macs": macs["macs"],
                       "params": macs["params"], "macs_removed": 1 - macs["macs"] / macs["macs_dense"]}
                runs[method].append(row)
                if lat is None and method == "random_coarse":
                    small = sped_up(model, own_masks(space_m, cand), example)
                    torch.testing.assert_close(small(data.x_test[:16]), model.eval()(data.x_test[:16]), atol=1e-4, rtol=1e-4)
                    # dense and pruned timed back to back, so both see the same machine state
                    lat = {"dense_b1": latency(dense, x1, args.repeats),
                           "b1": latency(small, x1, args.repeats),
                           "dense_b64": latency(dense, x64, max(5, args.repeats // 5)),
                           "b64": latency(small, x64, max(5, args.repeats // 5)),
                           "params": sum(p.numel() for p in small.parameters()),
                           "macs": count_macs(small, example)["macs_dense"]}
                log.info("%s level %.1f seed %d %-20s test %.4f (drop %.2f pp)", name, level, seed, method, row["test"],
                         100 * (dense_test - row["test"]))
        full = max(curve_bn) if curve_bn else 1
        gain = curve_bn[full][0] - curve_bn[1][0]
        sufficient = next((n for n in sorted(curve_bn) if curve_bn[n][0] >= curve_bn[1][0] + 0.9 * gain), full)
        out["levels"].append({
            "level": level, "ratio": ratio, "macs_removed": runs["random_coarse"][0]["macs_removed"],
            "score_seconds": score_s, "evaluations": 2 * len(stream), "l1_val": l1_score,
            "curve_adaptive_bn": curve_bn, "curve_plain": curve_plain, "sufficient_n": sufficient,
            "rank_corr_bn_vs_plain": float(np.corrcoef(np.argsort(np.argsort(s_bn)), np.argsort(np.argsort(s_plain)))[0, 1]),
            "runs": runs, "latency_pruned": lat,
        })
    return out


def table(results):
    lines = []
    for r in results:
        ref = r.get("dense_retrained_test")
        if ref:
            lines.append(f"\n{r['model']}: dense + the same {r.get('steps', '')} retraining steps: test "
                         f"{100 * np.mean(ref):.2f} ± {100 * np.std(ref):.2f}% (the fair reference; drops below are "
                         f"against the dense model as trained, drop* against this one)")
        lines.append(f"{r['model']}: dense test {100 * r['dense_test']:.2f}%, {r['macs_dense'] / 1e6:.2f} M MACs, "
                     f"{r['params_dense']} params, latency b1 {1e3 * r['latency_dense']['b1']:.2f} ms, "
                     f"b64 {1e3 * r['latency_dense']['b64']:.1f} ms")
        lines.append(f"{'MACs removed':>12s} {'ratio':>6s} {'method':22s} {'test % (mean ± sd)':>20s} {'drop pp':>8s} "
                     f"{'drop* pp':>8s} {'MACs x':>7s} {'params x':>8s}")
        for lv in r["levels"]:
            for m in METHODS:
                rows = lv["runs"][m]
                t = [x["test"] for x in rows]
                lines.append(f"{100 * lv['macs_removed']:11.1f}% {lv['ratio']:6.3f} {m:22s} "
                             f"{100 * np.mean(t):12.2f} ± {100 * np.std(t):4.2f} {100 * (r['dense_test'] - np.mean(t)):8.2f} "
                             f"{100 * (np.mean(ref) - np.mean(t)) if ref else float('nan'):8.2f} "
                             f"{r['macs_dense'] / rows[0]['macs']:7.2f} {r['params_dense'] / rows[0]['params']:8.2f}")
            lat = lv["latency_pruned"]
            lines.append(f"{'':12s} sped-up model: {lat['params']} params, latency b1 {1e3 * lat['b1']:.2f} ms "
                         f"({lat['dense_b1'] / lat['b1']:.2f}x faster), b64 {1e3 * lat['b64']:.1f} ms "
                         f"({lat['dense_b64'] / lat['b64']:.2f}x faster); "
                         f"best-of-N val (adaptive BN): " + ", ".join(
                             f"N={n}: {100 * v[0]:.1f}" for n, v in lv["curve_adaptive_bn"].items())
                         + f"; sufficient N {lv['sufficient_n']}")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for lv in r["levels"]:
            for key, style in (("curve_adaptive_bn", "-o"), ("curve_plain", ":x")):
                ns = [int(n) for n in lv[key]]
                mean = [100 * v[0] for v in lv[key].values()]
                sd = [100 * v[1] for v in lv[key].values()]
                ax.errorbar(ns, mean, yerr=sd, fmt=style, capsize=2,
                            label=f"{100 * lv['level']:.0f}% MACs, {'adaptive BN' if key == 'curve_adaptive_bn' else 'stored BN'}")
        ax.set_xscale("log")
        ax.set_xlabel("N (candidates)")
        ax.set_ylabel("best-of-N validation accuracy before retraining (%)")
        ax.set_title(r["model"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet", "vgg"])
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--stream", type=int, default=300, help="candidates scored per MACs level")
    ap.add_argument("--n", type=int, default=100, help="N of random_coarse in the accuracy comparison")
    ap.add_argument("--orders", type=int, default=50, help="random orders for the best-of-N curve")
    ap.add_argument("--search-val", type=int, default=256, help="validation images scoring a candidate")
    ap.add_argument("--bn-batches", type=int, default=4, help="training batches of 64 for adaptive BN")
    ap.add_argument("--steps", type=int, default=150, help="retraining steps (batch 128), the same for every method")
    ap.add_argument("--ft-limit", type=int, default=20000)
    ap.add_argument("--dense-epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=50, help="latency repeats at batch 1 (batch 64: a fifth)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/coarse")
    ap.add_argument("--add-dense-reference", action="store_true",
                    help="only add the dense-retrained reference to an existing --out results.json and re-print")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    data = load_idx_dataset(args.data, val_size=5000, train_limit=args.ft_limit, seed=0)
    out = Path(args.out)
    if args.add_dense_reference:
        saved = json.loads((out / "results.json").read_text())
        results = saved["results"]
        for r in results:
            dense = dense_model(r["model"], data, saved["args"]["dense_epochs"], 0, args.data)
            args.steps, args.seeds, args.ft_limit = saved["args"]["steps"], saved["args"]["seeds"], saved["args"]["ft_limit"]
            r["dense_retrained_test"] = dense_reference(dense, data, args, make_evaluate(data.x_test, data.y_test))
            r["steps"] = args.steps
    else:
        results = [dict(run_model(m, args, data), steps=args.steps) for m in args.models]
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    if args.add_dense_reference:
        saved["results"] = results
        (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    else:
        (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    plot(results, out / "score_vs_n.png")


if __name__ == "__main__":
    main()
