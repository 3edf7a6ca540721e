"""de_channel against uniform and global channel pruning at equal MACs (Fashion-MNIST 32x32).

For each model, seed and MACs level (2x and 3x fewer MACs than dense), every method removes whole
channels from the same dense model down to (at most) that MACs level, then retrains with the same
optimiser for the same epochs; test accuracy, MACs, parameters and the measured CPU latency of the
physically smaller model (median of repeated runs, batch 1 and 64) are reported against dense.

Methods:
* ``de_channel``: DE over per-group channel counts, L1 channels, adaptive BN scoring (this plugin);
  ``de_channel[random]``: the same counts' channels chosen as the best of 20 random draws;
* ``l1_uniform``: Li et al.'s L1-norm filters at one uniform ratio (the core's ``l1_filter``);
* ``random_coarse``: best of N random masks at that uniform ratio (Anwar & Sung, adaptive BN);
* ``nni_l1norm``: NNI 3.0's L1NormPruner with NNI's dependency groups and ModelSpeedup, its ratio
  bisected to the MACs level (NNI rounds channel counts differently);
* ``tp_uniform`` / ``tp_global``: Torch-Pruning's MetaPruner, L1 magnitude importance, uniform
  and ``global_pruning=True``, its ``pruning_ratio`` bisected to the MACs level.
The uniform ratio is the one whose masks reach the MACs level (bisection on the closed-form cost).

Two protocols: ``--reference trained`` (a dense model trained here for a few epochs on a subset, Adam
retraining) and ``--reference converged`` (the shipped converged reference of ``benchmarks/references.py``,
55,000 training images, all 10,000 test images, the reference's fine-tune recipe: ``--epochs`` of
``--epoch-steps`` batches of 256, cosine to zero, the same batches for every method of a seed).

    python benchmarks/channel.py --models resnet20 --seeds 0 1 2 --out benchmarks/results/channel
    python benchmarks/channel.py --reference converged --models resnet20 --seeds 0 1 2 --latency-levels \
        --methods de_channel "de_channel[finalists]" l1_uniform tp_global --out benchmarks/results/channel_converged
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tvzoo import SITE  # noqa: E402  (Torch-Pruning lives in .zoo-site, benchmarks only)
from cells import check_protocol, write_merged  # noqa: E402
import references as refs  # noqa: E402

import de_plugin  # noqa: E402
from de_plugin.adapter import measure_latency, slice_channels  # noqa: E402
from de_plugin.channels.channel import ChannelOptions, channel_space  # noqa: E402
from de_plugin.channels.coarse import count_macs  # noqa: E402
from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset  # noqa: E402
from de_plugin.demo.training import dense_model, make_evaluate, make_finetune  # noqa: E402
from de_plugin.targets import find_targets  # noqa: E402

LEVELS = [1 / 2, 1 / 3]  # MACs kept: 2x and 3x fewer
METHODS = ["de_channel", "de_channel[finalists]", "de_channel[random]", "l1_uniform", "random_coarse", "nni_l1norm",
           "tp_uniform", "tp_global"]
CONFIG = {"resnet20": {"dense_epochs": 6}, "mobilenetv2": {"dense_epochs": 4}}
log = logging.getLogger("channel")


class Setup:
    """One model and seed: data, the dense model, the scoring and retraining callables."""

    def __init__(self, name: str, seed: int, data, args):
        self.name, self.seed, self.data, self.args = name, seed, data, args
        if args.reference == "converged":
            self.dense = refs.load_reference(name)[0]
        else:
            self.dense = dense_model(name, data, CONFIG[name]["dense_epochs"], seed, args.data, in_channels=1).eval()
        self.example = data.x_val[:2]
        self.search = make_evaluate(data.x_val[: args.search_val], data.y_val[: args.search_val])
        self.test = make_evaluate(data.x_test, data.y_test)
        self.calib = [(data.x_train[i:i + 128], data.y_train[i:i + 128]) for i in range(0, 128 * 8, 128)]
        self.macs_dense = count_macs(self.dense, self.example)["macs_dense"]
        self.params_dense = sum(p.numel() for p in self.dense.parameters())

    def finetune(self):
        """The shared retraining; ``.steps`` counts all its steps, ``.last`` those of its latest call."""
        inner = (self._reference_finetune() if self.args.reference == "converged"
                 else make_finetune(self.data.x_train, self.data.y_train, lr=5e-4))

        def finetune(model: torch.nn.Module, epochs: int) -> None:
            before = inner.steps
            inner(model, epochs)
            finetune.steps, finetune.last = inner.steps, inner.steps - before
        finetune.steps = finetune.last = 0
        return finetune

    def _reference_finetune(self):
        """The converged reference's fine-tune recipe: ``epochs x --epoch-steps`` steps, cosine to zero, the
        same batches in every call for this seed (finalists and methods compared on equal terms)."""
        name, data, seed, per_epoch = self.name, self.data, self.seed, self.args.epoch_steps

        def inner(model: torch.nn.Module, epochs: int) -> None:
            steps = int(epochs) * per_epoch
            if steps > 0:
                refs.train_steps(model, data.x_train, data.y_train, steps, refs.FINETUNE[name], seed, schedule="cosine")
            inner.steps += steps
        inner.steps = 0
        return inner

    def uniform_ratio(self, level: float) -> float:
        """The uniform feature-map ratio whose channel removal keeps at most ``level`` of the MACs."""
        space, cost = channel_space(self.dense, self.example, find_targets(self.dense, None, None, None),
                                    ChannelOptions(macs=level, max_group_ratio=0.95))
        lo, hi = 0.0, 0.95
        for _ in range(30):
            mid = (lo + hi) / 2
            q = np.maximum(1, cost.size - np.round(mid * cost.size)).astype(np.int64)
            lo, hi = (mid, hi) if cost.macs(q) / cost.macs_dense > level else (lo, mid)
        return hi


def measured(setup: Setup, small: torch.nn.Module, steps: int, extra: dict) -> dict:
    """Test accuracy, cost and latency of a physically pruned, retrained model."""
    x = setup.example
    macs = count_macs(small, x)["macs_dense"]
    row = {"test": setup.test(small), "macs": macs / setup.macs_dense,
           "params": sum(p.numel() for p in small.parameters()) / setup.params_dense, "steps": steps, **extra}
    torch.set_num_threads(setup.args.threads)
    row["latency_b1"] = measure_latency(small, x, 1, repeats=setup.args.repeats)
    row["latency_b64"] = measure_latency(small, x, 64, repeats=max(5, setup.args.repeats // 3))
    return row


def run_ours(setup: Setup, method: str, level: float) -> dict:
    """de_channel / l1_uniform / random_coarse through the core, sliced by the core."""
    a, ft = setup.args, setup.finetune()
    common = dict(evaluate=setup.search, finetune=ft, seed=setup.seed, progress=False)
    t0 = time.perf_counter()
    if method.startswith("de_channel"):
        choice = {"channel_choice": "random", "candidates": 20} if method.endswith("[random]") else {}
        if method.endswith("[finalists]"):
            choice = {"finalists": a.finalists, "finalist_epochs": 1,
                      "finalist_adaptive_bn": a.finalist_bn == "re-estimated"}
        r = de_plugin.prune(setup.dense, "de_channel", macs=level, rounds=1, finetune_epochs=a.epochs,
                            generations=a.generations, train_data=setup.calib, **choice, **common)
        extra = {"kept_share": [g["kept"] / g["channels"] for g in r.extra["groups"]],
                 "group_layers": [g["layers"][0] for g in r.extra["groups"]]}
        finalists = r.history[-1]["de"].get("finalists")
        if finalists:  # their short retraining is search cost: the final retraining is the last call's steps
            extra.update(finalists=finalists, search_steps=ft.steps - ft.last)
    else:
        ratio = setup.uniform_ratio(level)
        opts = {"candidates": a.candidates, "train_data": setup.calib} if method == "random_coarse" else {}
        r = de_plugin.prune(setup.dense, "l1_filter" if method == "l1_uniform" else "random_coarse",
                            feature_map_ratio=ratio, finetune_epochs=a.epochs, **opts, **common)
        extra = {"ratio": ratio}
    seconds = time.perf_counter() - t0
    small = r.model.eval()
    slice_channels(small, setup.example, r.extra_masks)
    return measured(setup, small, ft.last, {"nfev": r.nfev, "search_seconds": seconds, **extra})


def run_nni(setup: Setup, level: float) -> dict:
    """NNI's L1NormPruner with NNI's dependency groups and ModelSpeedup, its sparse_ratio bisected to the
    MACs level (NNI rounds channel counts its own way), then retraining."""
    import de_plugin_nni
    from de_plugin_nni.coarse import nni_dependency_groups
    from nni.compression.pruning import L1NormPruner

    convs = [n for n, m in setup.dense.named_modules() if isinstance(m, torch.nn.Conv2d)]
    groups = nni_dependency_groups(setup.dense, setup.example, convs)
    grouped = {n: i for i, g in enumerate(groups) for n in g}

    def pruned(ratio: float):
        model = copy.deepcopy(setup.dense)
        cfg = [{"op_names": [n], "sparse_ratio": ratio, **({"dependency_group_id": grouped[n]} if n in grouped else {})}
               for n in convs]
        pruner = L1NormPruner(model, cfg)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        de_plugin_nni.speedup(model, setup.example, masks, engine="nni")
        return model

    r = setup.uniform_ratio(level)
    return _bisected(setup, level, pruned, (max(0.0, r - 0.15), min(0.95, r + 0.15)))


def _bisected(setup: Setup, level: float, pruned, bounds: tuple[float, float], steps: int = 10) -> dict:
    """The smallest ratio in ``bounds`` (bisection) whose pruned model keeps at most ``level`` of the MACs,
    retrained like every method."""
    t0 = time.perf_counter()
    lo, hi = bounds
    for _ in range(steps):
        mid = (lo + hi) / 2
        macs = count_macs(pruned(mid), setup.example)["macs_dense"] / setup.macs_dense
        lo, hi = (mid, hi) if macs > level else (lo, mid)
    model = pruned(hi)
    seconds = time.perf_counter() - t0
    ft = setup.finetune()
    torch.manual_seed(setup.seed)
    ft(model, setup.args.epochs)
    return measured(setup, model.eval(), ft.steps, {"ratio": hi, "search_seconds": seconds, "nfev": 0})


def run_tp(setup: Setup, level: float, global_pruning: bool) -> dict:
    """Torch-Pruning's MetaPruner (L1 magnitude), pruning_ratio bisected to the MACs level."""
    if str(SITE) not in sys.path:
        sys.path.append(str(SITE))
    import torch_pruning as tp

    def pruned(ratio: float):
        model = copy.deepcopy(setup.dense)
        ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # the classifier
        p = tp.pruner.MetaPruner(model, setup.example, importance=tp.importance.MagnitudeImportance(p=1),
                                 pruning_ratio=ratio, ignored_layers=ignored, global_pruning=global_pruning)
        p.step()
        return model

    r = setup.uniform_ratio(level)
    return _bisected(setup, level, pruned, (0.0, 0.95) if global_pruning else (max(0.0, r - 0.15), min(0.95, r + 0.15)),
                     steps=12)


def run_latency(setup: Setup, level: float) -> dict:
    """de_channel under a latency budget (fraction of the dense latency at ``--latency-batch``), the result
    re-measured independently (fresh dense and sliced timings)."""
    a, ft = setup.args, setup.finetune()
    t0 = time.perf_counter()
    r = de_plugin.prune(setup.dense, "de_channel", latency=level, latency_batch=a.latency_batch, rounds=1,
                        finetune_epochs=a.epochs, generations=a.generations, train_data=setup.calib,
                        evaluate=setup.search, finetune=ft, seed=setup.seed, progress=False)
    seconds = time.perf_counter() - t0
    small = r.model.eval()
    slice_channels(small, setup.example, r.extra_masks)
    row = measured(setup, small, ft.steps, {"nfev": r.nfev, "search_seconds": seconds})
    dense = measure_latency(setup.dense, setup.example, a.latency_batch, repeats=a.repeats)
    again = measure_latency(small, setup.example, a.latency_batch, repeats=a.repeats)
    h = r.history[-1]
    row.update({"target": level, "latency_share": again / dense, "search_measured": h["latency"],
                "search_tries": h["de"]["latency_measured"], "predicted": h["latency_predicted"]})
    return row


def run_one(setup: Setup, method: str, level: float) -> dict:
    torch.manual_seed(setup.seed)
    if method == "nni_l1norm":
        return run_nni(setup, level)
    if method.startswith("tp_"):
        return run_tp(setup, level, method == "tp_global")
    return run_ours(setup, method, level)


# ---------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    lines = []
    for mname, mres in results["models"].items():
        dense = mres["dense"]
        lines.append(f"\n{mname}: dense test {_ms([d['test'] for d in dense.values()])}, latency b1 "
                     f"{1000 * statistics.median(d['latency_b1'] for d in dense.values()):.2f} ms, b64 "
                     f"{1000 * statistics.median(d['latency_b64'] for d in dense.values()):.1f} ms")
        lines.append("| MACs level | method | seeds | test acc (%) | vs l1_uniform (pp, paired) | MACs kept | params kept "
                     "| latency b1 (x dense) | latency b64 (x dense) | evals | search s | retrain steps |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for lkey, rows in mres["levels"].items():
            for method, per_seed in rows.items():
                seeds = sorted(per_seed)
                vals = [per_seed[s] for s in seeds]
                base = rows.get("l1_uniform", {})
                paired = [100 * (per_seed[s]["test"] - base[s]["test"]) for s in seeds if s in base]
                lat = lambda k: statistics.median(per_seed[s][k] / dense[s][k] for s in seeds)  # noqa: E731
                lines.append(
                    f"| 1/{1 / float(lkey):.0f} | {method} | {len(seeds)} | {_ms([v['test'] for v in vals])} | "
                    f"{np.mean(paired):+.2f} | {np.mean([v['macs'] for v in vals]):.3f} | "
                    f"{np.mean([v['params'] for v in vals]):.3f} | {lat('latency_b1'):.2f} | {lat('latency_b64'):.2f} | "
                    f"{np.mean([v['nfev'] for v in vals]):.0f} | {np.mean([v['search_seconds'] for v in vals]):.0f} | "
                    f"{vals[0]['steps']}{_search_steps(vals)} |")
        if mres.get("latency"):
            lines.append(f"\n{mname}: de_channel under a latency budget (batch {results['args'].get('latency_batch', 64)}; "
                         "share of the dense latency, re-measured after the run)")
            lines.append("| budget | seeds | measured share | within 5%? | measured in the search | predicted by the table "
                         "| test acc (%) | MACs kept | evals |")
            lines.append("|---|---|---|---|---|---|---|---|---|")
            for lkey, per_seed in mres["latency"].items():
                vals = list(per_seed.values())
                met = sum(abs(v["latency_share"] / v["target"] - 1) <= 0.05 for v in vals)
                lines.append(f"| {float(lkey):.2f} | {len(vals)} | {_join(vals, 'latency_share')} | {met}/{len(vals)} | "
                             f"{_join(vals, 'search_measured')} | {_join(vals, 'predicted')} | "
                             f"{_ms([v['test'] for v in vals])} | {np.mean([v['macs'] for v in vals]):.3f} | "
                             f"{np.mean([v['nfev'] for v in vals]):.0f} |")
    return "\n".join(lines)


def _search_steps(vals: list[dict]) -> str:
    """de_channel[finalists] retrains its finalists while searching: that training is shown apart."""
    extra = [v["search_steps"] for v in vals if "search_steps" in v]
    return f" (+{np.mean(extra):.0f} in the search)" if extra else ""


def _join(vals: list[dict], key: str) -> str:
    return ", ".join(f"{v[key]:.3f}" for v in vals)


def _ms(xs: list[float]) -> str:
    return f"{100 * np.mean(xs):.2f} ± {100 * np.std(xs):.2f}"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for mname, mres in results["models"].items():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
        methods = sorted({m for rows in mres["levels"].values() for m in rows})
        for method in methods:
            pts = sorted((np.mean([v["macs"] for v in rows[method].values()]),
                          100 * np.mean([v["test"] for v in rows[method].values()]))
                         for rows in mres["levels"].values() if method in rows)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(100 * np.mean([d["test"] for d in mres["dense"].values()]), color="k", ls=":", label="dense")
        ax.set(xlabel="MACs kept (fraction of dense)", ylabel="test accuracy (%)", title=f"{mname}: accuracy vs MACs")
        ax.legend(fontsize=7)
        layers = []
        for lkey, rows in mres["levels"].items():
            de = rows.get("de_channel", {})
            if de:
                shares = np.mean([v["kept_share"] for v in de.values()], axis=0)
                bx.plot(shares, marker="o", label=f"MACs 1/{1 / float(lkey):.0f}")
                layers = next(iter(de.values()))["group_layers"]
        bx.set_xticks(range(len(layers)), layers, rotation=75, fontsize=6)  # no de_channel rows: an empty panel
        bx.set(ylabel="channels kept (share)", title="de_channel: channels kept per coupled group (seed mean)")
        if layers:
            bx.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{mname}.png", dpi=120)
        plt.close(fig)


def _fill(into: dict, other: dict) -> None:
    """Add to ``into`` (in place: the caller's references into it stay valid) what ``other`` has and it lacks."""
    for k, v in other.items():
        if k not in into:
            into[k] = v
        elif isinstance(v, dict) and isinstance(into[k], dict):
            _fill(into[k], v)


def save(path: Path, results: dict) -> None:
    """Write ``results`` with the cells another run added to the file since (runs of different seeds may
    share one folder; ``cells.write_merged``)."""
    def merge(disk: dict | None) -> dict:
        if disk is not None:
            _fill(results, disk)
        return results
    write_merged(path, merge)


#: what may differ between runs that add cells to one results file (which cells); the rest is the protocol
CELL_ARGS = {"models", "seeds", "methods", "levels", "latency_levels", "summary_only", "out", "threads"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20"], choices=list(CONFIG))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--levels", nargs="+", type=float, default=LEVELS, help="MACs kept (fractions of dense)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--reference", choices=["trained", "converged"], default="trained",
                    help="trained: a dense model trained here on --train-limit images; converged: the shipped "
                         "converged reference (benchmarks/references.py), all training and test images")
    ap.add_argument("--epochs", type=int, default=2, help="retraining epochs (all methods)")
    ap.add_argument("--epoch-steps", type=int, default=50,
                    help="--reference converged: batches of 256 per retraining epoch")
    ap.add_argument("--train-limit", type=int, default=8000)
    ap.add_argument("--search-val", type=int, default=500, help="validation images the searches score on")
    ap.add_argument("--generations", type=int, default=10, help="de_channel: DE generations")
    ap.add_argument("--finalists", type=int, default=3,
                    help="de_channel[finalists]: best distinct shapes of the search re-ranked after one epoch of "
                         "retraining (besides its seeds)")
    ap.add_argument("--finalist-bn", default="re-estimated", choices=["re-estimated", "as-trained"],
                    help="de_channel[finalists]: retrained finalists scored with BatchNorm statistics re-estimated as "
                         "the search's (the default), or as their retraining left them (finalist_adaptive_bn=False)")
    ap.add_argument("--candidates", type=int, default=50, help="random_coarse: random masks scored")
    ap.add_argument("--repeats", type=int, default=30, help="latency: timed runs (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-levels", nargs="*", type=float, default=[0.5, 0.7],
                    help="de_channel latency budgets (fractions of dense latency), the second table")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--out", default="benchmarks/results/channel")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"args": vars(args), "models": {}}
    if not args.summary_only:
        cell_free = lambda d: {k: v for k, v in d.items() if k not in CELL_ARGS}  # noqa: E731
        defaults = vars(ap.parse_args([]))  # settings added later: their defaults are what older files used
        check_protocol(path, cell_free({**defaults, **results["args"]}), cell_free(vars(args)))
        if args.reference == "converged":
            results["weights"] = refs.check_weights(path, results.get("weights", {}), args.models)
            data = refs.load_data(args.models[0])  # the same 32x32 splits for every CNN reference
        else:
            data = load_idx_dataset(args.data, val_size=2000, train_limit=args.train_limit, seed=0, size=32)
            data.x_test, data.y_test = data.x_test[:5000], data.y_test[:5000]
        t_start = time.time()
        for mname in args.models:
            mres = results["models"].setdefault(mname, {"dense": {}, "levels": {}})
            for seed in args.seeds:
                setup = Setup(mname, seed, data, args)
                mres["dense"][str(seed)] = measured(setup, copy.deepcopy(setup.dense), 0, {"nfev": 0, "search_seconds": 0})
                for level in args.latency_levels:
                    if str(seed) in mres.get("latency", {}).get(f"{level:.6f}", {}):
                        continue
                    row = run_latency(setup, level)
                    mres.setdefault("latency", {}).setdefault(f"{level:.6f}", {})[str(seed)] = row
                    print(f"[{time.time() - t_start:6.0f}s] {mname} seed {seed} latency budget {level:.2f}: measured "
                          f"{row['latency_share']:.3f} (search {row['search_measured']:.3f}, predicted "
                          f"{row['predicted']:.3f}) test {row['test']:.4f} MACs {row['macs']:.3f}", flush=True)
                    save(path, results)
                for level in args.levels:
                    rows = mres["levels"].setdefault(f"{level:.6f}", {})
                    for method in args.methods:
                        if str(seed) in rows.get(method, {}):  # measured by an earlier run: resumed, not recomputed
                            continue
                        row = run_one(setup, method, level)
                        rows.setdefault(method, {})[str(seed)] = row
                        print(f"[{time.time() - t_start:6.0f}s] {mname} seed {seed} MACs {level:.3f} {method:20s} "
                              f"test {row['test']:.4f} MACs {row['macs']:.3f} params {row['params']:.3f} "
                              f"b1 {1000 * row['latency_b1']:.2f} ms evals {row['nfev']}", flush=True)
                        save(path, results)
    text = table(results)
    print(text)
    (out / "table.md").write_text(text + "\n")
    plot(results, out)


if __name__ == "__main__":
    main()
