"""de_layerwise against the baselines on LeNet-300-100 and LeNet-5 (Fashion-MNIST), one run.

Every method follows the same sparsity ladder from the same dense model: at each rung it is
pruned further (``prune(..., rounds=1)`` on the previous rung's fine-tuned model) and fine-tuned
for the same number of epochs with the same optimiser, so all methods spend exactly the same
gradient steps (DE's fitness does no training). Test accuracy is recorded at every rung; from the
curve we read the compression reached within 0.5 pp and 1 pp of the dense test accuracy, and the
accuracy at 90/95/98% sparsity. ``--ablation`` adds de_layerwise with recovery none / random /
splicing, judged on *validation* accuracy (defaults are chosen on validation data only).

    python benchmarks/layerwise.py --seeds 0 1 2 --out benchmarks/results/layerwise
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import de_plugin
from de_plugin.demo.data import load_idx_dataset
from de_plugin.demo.models import create_model
from de_plugin.demo.training import make_evaluate, make_finetune, train

LADDER = [0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99]
CONFIG = {
    # dense epochs, train subset used for fine-tuning, val images used by the search, DE size
    "lenet300": {"dense_epochs": 20, "ft_limit": None, "search_val": 5000, "population": 20, "generations": 15},
    "lenet5": {"dense_epochs": 8, "ft_limit": 20000, "search_val": 1000, "population": 12, "generations": 8},
}
BASELINES = ["global_magnitude", "lamp", "erk", "uniform_magnitude"]


def run_method(method, dense, data, cfg, seed, epochs, options):
    """Walk the ladder with one method; return per-rung measurements."""
    x_ft, y_ft = data.x_train, data.y_train
    if cfg["ft_limit"]:
        x_ft, y_ft = x_ft[: cfg["ft_limit"]], y_ft[: cfg["ft_limit"]]
    finetune = make_finetune(x_ft, y_ft, lr=5e-4)
    search_eval = make_evaluate(data.x_val[: cfg["search_val"]], data.y_val[: cfg["search_val"]])
    val_eval = make_evaluate(data.x_val, data.y_val)
    test_eval = make_evaluate(data.x_test, data.y_test)
    options = dict(options)
    metric = options.pop("metric", None)  # a fitness metric other than accuracy: the same subset as batches
    nv = cfg["search_val"]
    scoring = {"evaluate": search_eval} if metric is None else {
        "metric": metric, "val_data": [(data.x_val[i : min(i + 250, nv)], data.y_val[i : min(i + 250, nv)])
                                       for i in range(0, nv, 250)]}
    model = copy.deepcopy(dense)
    rows, nfev, search_s = [], 0, 0.0
    for i, s in enumerate(LADDER):
        torch.manual_seed(seed * 100 + i)
        res = de_plugin.prune(model, method, **scoring, finetune=finetune, sparsity=s, seed=seed * 100 + i,
                              rounds=1, finetune_epochs=epochs, progress=False, **options)
        model = res.model
        nfev += res.nfev
        search_s += sum(h.get("search_seconds", 0.0) for h in res.history)
        rows.append({"sparsity": res.sparsity, "layer_sparsity": res.layer_sparsity,
                     "val": val_eval(model), "test": test_eval(model), "steps": finetune.steps,
                     "nfev": nfev, "search_seconds": search_s})
    return rows


def run_nni_level(dense, data, cfg, seed, epochs, options):
    """NNI's LevelPruner (per-layer magnitude, as NNI users configure it) on the same ladder.

    Each rung: LevelPruner at the rung's sparse_ratio on the previous rung's model, then the same
    fine-tune epochs with the masks kept (gradients of pruned weights masked)."""
    from nni.compression.pruning import LevelPruner

    from de_plugin_nni.quantize import zeros_kept

    x_ft, y_ft = (data.x_train[: cfg["ft_limit"]], data.y_train[: cfg["ft_limit"]]) if cfg["ft_limit"] else (data.x_train, data.y_train)
    finetune = make_finetune(x_ft, y_ft, lr=5e-4)
    val_eval, test_eval = make_evaluate(data.x_val, data.y_val), make_evaluate(data.x_test, data.y_test)
    model = copy.deepcopy(dense)
    rows = []
    for i, s in enumerate(LADDER):
        torch.manual_seed(seed * 100 + i)
        pruner = LevelPruner(model, [{"op_types": ["Linear", "Conv2d"], "target_names": ["weight"], "sparse_ratio": s}])
        _, masks = pruner.compress()
        pruner.unwrap_model()
        with torch.no_grad():
            for name, t in masks.items():
                model.get_submodule(name).weight.mul_(t["weight"])
        with zeros_kept(model):
            finetune(model, epochs)
        kept = sum(int(t["weight"].sum()) for t in masks.values())
        total = sum(t["weight"].numel() for t in masks.values())
        rows.append({"sparsity": 1 - kept / total, "layer_sparsity": {k: 1 - float(t["weight"].mean()) for k, t in masks.items()},
                     "val": val_eval(model), "test": test_eval(model), "steps": finetune.steps, "nfev": 0,
                     "search_seconds": 0.0})
    return rows


def run_nni_agp(dense, data, cfg, seed, epochs, options):
    """NNI's AGPPruner(LevelPruner): one gradual run per rung's sparsity, given exactly the training
    steps the ladder spends up to that rung (so the budget matches at every rung)."""
    import nni
    from nni.compression import TorchEvaluator
    from nni.compression.pruning import AGPPruner, LevelPruner

    import torch.nn.functional as F

    x_ft, y_ft = (data.x_train[: cfg["ft_limit"]], data.y_train[: cfg["ft_limit"]]) if cfg["ft_limit"] else (data.x_train, data.y_train)
    steps_per_epoch = -(-len(y_ft) // 128)
    val_eval, test_eval = make_evaluate(data.x_val, data.y_val), make_evaluate(data.x_test, data.y_test)
    rows = []
    for i, s in enumerate(LADDER):
        if s not in (0.9, 0.95, 0.98):  # AGP restarts from dense for every target: only the reported rungs
            rows.append(None)
            continue
        torch.manual_seed(seed * 100 + i)
        model = copy.deepcopy(dense)
        total_steps = (i + 1) * epochs * steps_per_epoch

        def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
            model.train()
            done = 0
            while True:
                perm = torch.randperm(len(y_ft))
                for j in range(0, len(perm), 128):
                    idx = perm[j : j + 128]
                    optimizers.zero_grad()
                    training_step((x_ft[idx], y_ft[idx]), model).backward()
                    optimizers.step()
                    done += 1
                    if done >= max_steps:
                        return

        evaluator = TorchEvaluator(training_func, nni.trace(torch.optim.Adam)(model.parameters(), lr=5e-4),
                                   lambda b, m: F.cross_entropy(m(b[0]), b[1]))
        times = i + 1
        interval = max(1, (total_steps - epochs * steps_per_epoch) // times)  # last pruning leaves `epochs` of fine-tune
        # the evaluator goes to the inner pruner: NNI maps the optimizer's parameters to names on the
        # model as it is then (given only to AGP, after the inner pruner wrapped the model, training
        # updates orphaned tensors)
        inner = LevelPruner(model, [{"op_types": ["Linear", "Conv2d"], "target_names": ["weight"], "sparse_ratio": s}],
                            evaluator)
        agp = AGPPruner(inner, interval_steps=interval, total_times=times)
        _, masks = agp.compress(max_steps=total_steps, max_epochs=None)
        agp.unwrap_model()
        with torch.no_grad():
            for name, t in masks.items():
                model.get_submodule(name).weight.mul_(t["weight"])
        kept = sum(int(t["weight"].sum()) for t in masks.values())
        total = sum(t["weight"].numel() for t in masks.values())
        rows.append({"sparsity": 1 - kept / total, "val": val_eval(model), "test": test_eval(model),
                     "steps": total_steps, "nfev": 0, "search_seconds": 0.0})
    return rows


def run_inc(criterion: str):
    """INC's own pruning loop with ``pruning_type=criterion`` (``magnitude``, ``snip_momentum``): one
    gradual run per reported rung, given the training steps the ladder spends up to that rung; INC
    prunes during all but the last ``epochs`` epochs (its iterative schedule), then fine-tunes."""

    def runner(dense, data, cfg, seed, epochs, options):
        import torch.nn.functional as F
        from neural_compressor.training import WeightPruningConfig, prepare_compression

        x_ft, y_ft = (data.x_train[: cfg["ft_limit"]], data.y_train[: cfg["ft_limit"]]) if cfg["ft_limit"] else (data.x_train, data.y_train)
        steps_per_epoch = -(-len(y_ft) // 128)
        val_eval, test_eval = make_evaluate(data.x_val, data.y_val), make_evaluate(data.x_test, data.y_test)
        rows = []
        for i, s in enumerate(LADDER):
            if s not in (0.9, 0.95, 0.98):
                rows.append(None)
                continue
            torch.manual_seed(seed * 100 + i)
            model = copy.deepcopy(dense)
            total_steps = (i + 1) * epochs * steps_per_epoch
            end = max(1, total_steps - epochs * steps_per_epoch)
            names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            conf = WeightPruningConfig([{"op_names": [f"^{n}$" for n in names], "pruning_type": criterion}],
                                       target_sparsity=s, pattern="1x1", start_step=0, end_step=end,
                                       pruning_frequency=max(1, end // (i + 1)), pruning_scope="global",
                                       max_sparsity_ratio_per_op=0.995, excluded_op_names=[])
            manager = prepare_compression(model, conf)
            opt = torch.optim.Adam(model.parameters(), lr=5e-4)
            manager.callbacks.on_train_begin()
            step = 0
            while step < total_steps:
                perm = torch.randperm(len(y_ft))
                for j in range(0, len(perm), 128):
                    if step >= total_steps:
                        break
                    idx = perm[j : j + 128]
                    manager.callbacks.on_step_begin(step)
                    F.cross_entropy(model(x_ft[idx]), y_ft[idx]).backward()
                    manager.callbacks.on_before_optimizer_step()
                    opt.step()
                    manager.callbacks.on_after_optimizer_step()
                    opt.zero_grad()
                    manager.callbacks.on_step_end()
                    step += 1
            manager.callbacks.on_train_end()
            ws = [model.get_submodule(n).weight for n in names]
            kept = sum(int((w != 0).sum()) for w in ws)
            total = sum(w.numel() for w in ws)
            rows.append({"sparsity": 1 - kept / total, "val": val_eval(model), "test": test_eval(model),
                         "steps": total_steps, "nfev": 0, "search_seconds": 0.0})
        return rows

    return runner


RUNNERS = {"nni_level": run_nni_level, "nni_agp": run_nni_agp, "inc_magnitude": run_inc("magnitude"),
           "inc_snip_momentum": run_inc("snip_momentum")}


def best_compression(rows, dense_test, max_drop):
    ok = [r["sparsity"] for r in rows if r is not None and dense_test - r["test"] <= max_drop + 1e-12]
    return 1.0 / (1.0 - max(ok)) if ok else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2, help="fine-tune epochs per rung (all methods)")
    ap.add_argument("--recovery", default="splicing", help="de_layerwise recovery in the main comparison")
    ap.add_argument("--ablation", action="store_true", help="also run de_layerwise with each recovery mode")
    ap.add_argument("--ablation-only", action="store_true", help="run only the recovery ablation")
    ap.add_argument("--baseline-recovery", default=None,
                    help="also run LAMP and ERK with this recovery (attributes a gain to search vs recovery)")
    ap.add_argument("--methods", nargs="*", default=None,
                    help="run only these methods (e.g. nni_level nni_agp), same dense models and ladder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ladder", nargs="+", type=float, default=None, help="sparsity rungs (default: LADDER)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="only summarize: merge results.json of runs on the same dense models (checked) into --out")
    ap.add_argument("--rename", nargs="*", default=[], help="with --merge: OLD::NEW method labels")
    ap.add_argument("--out", default="benchmarks/results/layerwise")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out), dict(r.split("::", 1) for r in args.rename))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.ladder:
        LADDER[:] = sorted(args.ladder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_idx_dataset()
    results: dict = {"ladder": LADDER, "epochs_per_rung": args.epochs, "models": {}}
    t_start = time.time()
    for mname in args.models:
        cfg = CONFIG[mname]
        mres = results["models"].setdefault(mname, {"dense_test": {}, "runs": {}})
        for seed in args.seeds:
            torch.manual_seed(seed)  # the dense model (init and training) depends on the seed only
            dense = create_model(mname)
            train(dense, data.x_train, data.y_train, epochs=cfg["dense_epochs"], seed=seed)
            dense_test = make_evaluate(data.x_test, data.y_test)(dense)
            mres["dense_test"][seed] = dense_test
            de_opts = {"population": cfg["population"], "generations": cfg["generations"]}
            methods = {"de_layerwise": ("de_layerwise", {**de_opts, "recovery": args.recovery})}
            methods.update({b: (b, {}) for b in BASELINES})
            if args.ablation_only:
                methods = {}
            if args.baseline_recovery:
                for b in ("lamp", "erk"):
                    methods[f"{b}[recovery={args.baseline_recovery}]"] = (b, {"recovery": args.baseline_recovery})
            methods.update({k: (k, {}) for k in RUNNERS})
            if args.methods is not None:
                methods = {k: v for k, v in methods.items() if k in args.methods}
            if args.ablation or args.ablation_only:
                for rec in ("none", "random", "splicing"):
                    if rec != args.recovery or args.ablation_only:
                        methods[f"de_layerwise[recovery={rec}]"] = ("de_layerwise", {**de_opts, "recovery": rec})
            for label, (method, opts) in methods.items():
                t0 = time.time()
                runner = RUNNERS.get(method, run_method)
                rows = runner(method, dense, data, cfg, seed, args.epochs, opts) if runner is run_method else \
                    runner(dense, data, cfg, seed, args.epochs, opts)
                mres["runs"].setdefault(label, {})[seed] = rows
                print(f"[{time.time() - t_start:7.0f}s] {mname} seed {seed} {label:32s} "
                      f"test@95% {(rows[LADDER.index(0.95)] or {}).get('test', float('nan')):.4f} "
                      f"(dense {dense_test:.4f}) {time.time() - t0:.0f}s",
                      flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))
    summarize(results, out)


def merge(dirs: list[str], out: Path, rename: dict | None = None) -> None:
    """Join runs made separately on identical dense models (same seeds: same dense test accuracy)."""
    merged: dict = {}
    for d in dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        if not merged:
            merged = r
            continue
        for mname, mres in r["models"].items():
            base = merged["models"].setdefault(mname, {"dense_test": mres["dense_test"], "runs": {}})
            for seed, acc in mres["dense_test"].items():
                if seed in base["dense_test"] and abs(base["dense_test"][seed] - acc) > 1e-9:
                    raise ValueError(f"{d}: {mname} seed {seed} dense model differs ({acc} vs {base['dense_test'][seed]})")
            for label, per_seed in mres["runs"].items():
                base["runs"].setdefault(label, {}).update(per_seed)
    for mres in merged["models"].values():  # relabel all at once (a swap of two labels works)
        mres["runs"] = {(rename or {}).get(k, k): v for k, v in mres["runs"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    summarize(merged, out)


def summarize(results: dict, out: Path) -> None:
    lines = []
    for mname, mres in results["models"].items():
        lines.append(f"\n## {mname} (dense test {np.mean(list(mres['dense_test'].values())):.4f}, "
                     f"{len(mres['dense_test'])} seeds, {results['epochs_per_rung']} fine-tune epochs per rung)\n")
        lines.append("| method | compression @<=0.5 pp | compression @<=1 pp | test drop @90% (pp) | @95% | @98% | search evals | fine-tune steps |")
        lines.append("|---|---|---|---|---|---|---|---|")
        comp05 = {}
        for label, per_seed in mres["runs"].items():
            c05, c1, d90, d95, d98, ev, st = [], [], [], [], [], [], []
            for seed, rows in per_seed.items():
                dt = mres["dense_test"][seed]
                c05.append(best_compression(rows, dt, 0.005))
                c1.append(best_compression(rows, dt, 0.01))
                by = {round(r["sparsity"], 3): r for r in rows if r is not None}
                nan = {"test": float("nan")}
                d90.append(100 * (dt - by.get(0.9, nan)["test"]))
                d95.append(100 * (dt - by.get(0.95, nan)["test"]))
                d98.append(100 * (dt - by.get(0.98, nan)["test"]))
                last = [r for r in rows if r is not None][-1]
                ev.append(last["nfev"])
                st.append(last["steps"])
            comp05[label] = np.mean(c05)
            f = lambda v, p=1: f"{np.mean(v):.{p}f} ± {np.std(v):.{p}f}"  # noqa: E731
            lines.append(f"| {label} | {f(c05)}x | {f(c1)}x | {f(d90, 2)} | {f(d95, 2)} | {f(d98, 2)} | {int(np.mean(ev))} | {int(np.mean(st))} |")
        plain = [v for k, v in comp05.items() if not k.startswith("de_layerwise") and "[" not in k]
        every = [v for k, v in comp05.items() if not k.startswith("de_layerwise")]
        if plain and "de_layerwise" in comp05:
            lines.append(f"\nde_layerwise / best baseline compression at <=0.5 pp: {comp05['de_layerwise'] / max(plain):.2f}x "
                         f"(against every other row, recovery variants and NNI included: "
                         f"{comp05['de_layerwise'] / max(every):.2f}x)")
        lines.append("\nvalidation accuracy per rung (mean over seeds; the ablation is judged on these):\n")
        lines.append("| method | " + " | ".join(f"{s:.3f}" for s in results["ladder"]) + " |")
        lines.append("|---|" + "---|" * len(results["ladder"]))
        for label, per_seed in mres["runs"].items():
            val = np.mean([[r["val"] if r else np.nan for r in rows] for rows in per_seed.values()], 0)
            lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in val) + " |")
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    plot(results, out)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["models"]), figsize=(6 * len(results["models"]), 4), squeeze=False)
    for ax, (mname, mres) in zip(axes[0], results["models"].items()):
        for label, per_seed in mres["runs"].items():
            drops = np.array([[100 * (mres["dense_test"][s] - r["test"]) if r else np.nan for r in rows]
                              for s, rows in per_seed.items()])
            comp = [1 / (1 - s) for s in results["ladder"]]
            ok = ~np.isnan(drops.mean(0))
            ax.errorbar(np.array(comp)[ok], drops.mean(0)[ok], yerr=drops.std(0)[ok], label=label, marker="o", ms=3, capsize=2)
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_ylim(-1.5, 6)  # uniform magnitude leaves the chart at high sparsity
        ax.set_xscale("log")
        ax.set_xlabel("compression (pruned layers)")
        ax.set_ylabel("test accuracy drop (pp)")
        ax.set_title(mname)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "layerwise.png", dpi=100)


if __name__ == "__main__":
    main()
