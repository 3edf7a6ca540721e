"""de_layerwise at depth: ResNet-20, the small ViT and MobileNetV2 on Fashion-MNIST 32x32.

The protocol of ``benchmarks/layerwise.py`` on deep models: every method walks the same sparsity
ladder from the same dense model, pruned further at each rung (``rounds=1`` on the previous
rung's fine-tuned model) and fine-tuned for the same epochs with the same optimiser. The
allocation baselines (LAMP, ERK, global and uniform magnitude) get *the same splicing recovery*
as de_layerwise; NNI's AGP(LevelPruner) and INC's snip_momentum get the same gradient steps up to
each rung they report (90% and 95%). The search works on a small validation subset
(``search_val`` images), the reported validation accuracy on the whole split, the test split only
for the table.

``--ablation`` runs the DE settings side by side (one round to 90% from the dense model, one
fine-tune epoch, judged on validation accuracy): per-layer vs grouped by stage, jDE, adaptive BN. Cut down to fit 2 CPU cores (training subsets, short schedules, one seed by
default): see BENCHMARKS.md for what was run.

    python benchmarks/deep.py --models resnet20 vit --seeds 0 --out benchmarks/results/deep
    python benchmarks/deep.py --ablation --models resnet20 --out benchmarks/results/deep_ablation
    python benchmarks/deep.py --reference converged --models resnet20 --seeds 0 1 2 --out benchmarks/results/deep_converged

A rerun with the same --out adds the (model, seed, method) cells it lacks and keeps the ones measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerwise as lw  # noqa: E402  (the ladder runners, shared with the LeNet benchmark)
import references as refs  # noqa: E402
from cells import check_protocol  # noqa: E402

import de_plugin  # noqa: E402
from de_plugin.demo.data import load_idx_dataset  # noqa: E402
from de_plugin.demo.models import create_model  # noqa: E402
from de_plugin.demo.training import make_evaluate, make_finetune, train  # noqa: E402

LADDER = [0.5, 0.8, 0.9, 0.95]
CONFIG = {
    "resnet20": {"dense_epochs": 6, "ft_limit": None, "search_val": 500, "generations": 8},
    "vit": {"dense_epochs": 8, "ft_limit": None, "search_val": 500, "generations": 8},
    "mobilenetv2": {"dense_epochs": 4, "ft_limit": None, "search_val": 300, "generations": 6},
    "resnet56": {"dense_epochs": 6, "ft_limit": None, "search_val": 500, "generations": 8},
}
BASELINES = ["lamp", "erk", "global_magnitude", "uniform_magnitude"]
ABLATION = {  # every setting gets train_data, so "default" scores with adaptive BN (the default for BN models)
    "default": {},
    "adaptive_bn=False": {"adaptive_bn": False},
    "groups=stage": {"groups": "stage"},
    "jde": {"adaptation": "jde"},
    # the search scores 2 of 8 validation batches (the same 500 images as the others), the 4 finalists
    # are re-scored on all 2,000
    "fidelity=0.25": {"fidelity": 0.25, "val_data": True},
    # the cost levers (the search's share of a full run): fewer BN batches per candidate,
    # no per-layer scan (the baseline seeds stand in), stop once the best stalls; and the loss fitness
    "bn_batches=2": {"bn_batches": 2},
    "sensitivity_scan=False": {"sensitivity_scan": False},
    "stall=2": {"stall": 2},
    "metric=neg_loss": {"metric": "neg_loss", "val_data": "search"},
    "fast": {"bn_batches": 2, "sensitivity_scan": False, "stall": 2},
}


def methods_for(cfg: dict, chosen: list[str] | None, calib: list) -> dict:
    de_opts = {"generations": cfg["generations"], "recovery": "splicing"}
    methods = {"de_layerwise": ("de_layerwise", de_opts),
               "de_layerwise[adaptive_bn]": ("de_layerwise", {**de_opts, "adaptive_bn": True, "train_data": calib})}
    # at the defaults (generations 20, stall 3 at depth, scan up to 32 layers, adaptive BN): what a user gets;
    # "no scan": the per-layer sensitivity scan off (the cost ablation's lever); neg_loss: the loss fitness
    methods["de_layerwise[defaults]"] = ("de_layerwise", {"recovery": "splicing", "train_data": calib})
    methods["de_layerwise[defaults,no scan]"] = ("de_layerwise", {"recovery": "splicing", "train_data": calib,
                                                                  "sensitivity_scan": False})
    methods["de_layerwise[defaults,no scan,neg_loss]"] = ("de_layerwise", {
        "recovery": "splicing", "train_data": calib, "sensitivity_scan": False, "metric": "neg_loss"})
    # the next cost levers / the stall's place at the hardest rung: one setting changed from the defaults
    for key, value in (("bn_batches", 2), ("stall", 5), ("stall", 0)):
        methods[f"de_layerwise[defaults,{key}={value}]"] = ("de_layerwise", {
            "recovery": "splicing", "train_data": calib, key: value})
    methods.update({f"{b}[splicing]": (b, {"recovery": "splicing"}) for b in BASELINES})
    methods.update({"nni_agp": ("nni_agp", {}), "inc_snip_momentum": ("inc_snip_momentum", {})})
    return {k: v for k, v in methods.items() if chosen is None or k in chosen}


def ablation(mname: str, dense, data, cfg: dict, seed: int, epochs: int, train_batches,
             only: list[str] | None = None) -> dict:
    """One round to 90% from the dense model per setting; validation accuracy after the same fine-tune."""
    search_eval = make_evaluate(data.x_val[: cfg["search_val"]], data.y_val[: cfg["search_val"]])
    val_eval = make_evaluate(data.x_val, data.y_val)
    rows = {}
    val_batches = [(data.x_val[i : i + 250], data.y_val[i : i + 250]) for i in range(0, len(data.y_val), 250)]
    search_batches = val_batches[: max(1, cfg["search_val"] // 250)]  # the search's subset, as batches
    for label, opts in ABLATION.items():
        if only and label not in only:
            continue
        opts = dict(opts)
        vd = opts.pop("val_data", False)
        scoring = {"val_data": search_batches if vd == "search" else val_batches} if vd else {"evaluate": search_eval}
        finetune = make_finetune(data.x_train, data.y_train, lr=5e-4)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        res = de_plugin.prune(copy.deepcopy(dense), "de_layerwise", **scoring, finetune=finetune,
                              sparsity=0.9, seed=seed, rounds=1, finetune_epochs=epochs, progress=False,
                              recovery="splicing", generations=cfg["generations"], train_data=train_batches, **opts)
        wall = time.perf_counter() - t0
        h = res.history[0]
        rows[label] = {"val_before_ft": h.get("val_accuracy_before_finetune"), "val": val_eval(res.model),
                       "search_seconds": h.get("search_seconds", 0.0), "wall_seconds": wall, "nfev": res.nfev,
                       "generations_run": h["de"]["nit"], "best_per_generation": h["de"]["history"]}
        print(f"  {mname} {label:16s} val {rows[label]['val']:.4f} (search pick {rows[label]['val_before_ft']:.4f}) "
              f"search {rows[label]['search_seconds']:.0f}s of {wall:.0f}s, {res.nfev} evals", flush=True)
    return rows


def forward_seconds(model, x) -> float:
    """One dense forward over ``x`` (the search's validation subset), best of 3."""
    best = float("inf")
    with torch.inference_mode():
        model.eval()
        for _ in range(3):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "vit"], choices=list(CONFIG))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=1, help="fine-tune epochs per rung (all methods)")
    ap.add_argument("--train-limit", type=int, default=8000, help="training images (dense training and fine-tune)")
    ap.add_argument("--methods", nargs="*", default=None, help="only these rows (ladder methods or ablation settings)")
    ap.add_argument("--ablation", action="store_true", help="only the DE settings ablation (one rung)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", choices=["converged", "trained"], default="trained",
                    help="'converged': start every seed from the converged reference of benchmarks/references.py "
                         "(55,000 training images, the full test set); 'trained': train a dense model per seed on "
                         "--train-limit images (the protocol of the sections measured that way)")
    ap.add_argument("--out", default="benchmarks/results/deep")
    ap.add_argument("--summary-only", action="store_true", help="re-make the table and plot from --out's results.json")
    ap.add_argument("--merge", nargs="*", default=[], help="with --summary-only: add the rows (seeds, methods) of "
                                                           "these runs' results.json to --out's, then summarize")
    args = ap.parse_args()
    if args.summary_only:
        results = json.loads((Path(args.out) / "results.json").read_text())
        for folder in args.merge:
            merge(results, json.loads((Path(folder) / "results.json").read_text()))
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
        summarize(results, Path(args.out))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    lw.LADDER[:] = LADDER
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reference == "converged":  # 55,000 / 5,000 / all 10,000 test images, as the references were trained
        data = refs.load_data(args.models[0])
    else:
        data = load_idx_dataset(val_size=2000, train_limit=args.train_limit, test_limit=5000, size=32)
    path = out / "results.json"
    results: dict = {"ladder": LADDER, "epochs_per_rung": args.epochs, "train_images": len(data.y_train),
                     "reference": args.reference, "models": {}, "ablation": {}}
    if path.exists():  # resume: cells (model, seed, method) already measured are kept, not recomputed
        saved = json.loads(path.read_text())
        keys = ("ladder", "epochs_per_rung", "train_images", "reference")
        check_protocol(path, {k: saved.get(k, "trained" if k == "reference" else None) for k in keys},
                       {k: results[k] for k in keys})
        results = saved
    if args.reference == "converged":
        results["weights"] = refs.check_weights(path, results.get("weights", {}), args.models)
    t_start = time.time()
    for mname in args.models:
        cfg = CONFIG[mname]
        mres = results["models"].setdefault(mname, {"dense_test": {}, "runs": {}, "wall": {}})
        for seed in map(str, args.seeds):
            todo = [lab for lab in methods_for(cfg, args.methods, []) if seed not in mres["runs"].get(lab, {})]
            if not todo and not args.ablation:
                print(f"{mname} seed {seed}: every method already measured in {path}", flush=True)
                continue
            dense = dense_for(mname, cfg, data, int(seed), args.reference)
            dense_test = make_evaluate(data.x_test, data.y_test)(dense)
            mres["dense_test"][seed] = dense_test
            mres["forward_seconds"] = forward_seconds(dense, data.x_val[: cfg["search_val"]])
            print(f"[{time.time() - t_start:6.0f}s] {mname} seed {seed}: dense test {dense_test:.4f}", flush=True)
            calib = [data.x_train[i : i + 128] for i in range(0, 128 * 8, 128)]
            if args.ablation:
                results["ablation"].setdefault(mname, {})[seed] = ablation(mname, dense, data, cfg, int(seed),
                                                                            args.epochs, calib, args.methods)
                (out / "results.json").write_text(json.dumps(results, indent=1))
                continue
            for label, (method, opts) in methods_for(cfg, todo, calib).items():
                t0 = time.time()
                runner = lw.RUNNERS.get(method)
                rows = runner(dense, data, cfg, int(seed), args.epochs, opts) if runner else \
                    lw.run_method(method, dense, data, cfg, int(seed), args.epochs, opts)
                mres["runs"].setdefault(label, {})[seed] = rows
                mres["wall"].setdefault(label, {})[seed] = time.time() - t0
                done = [r for r in rows if r is not None]
                print(f"[{time.time() - t_start:6.0f}s] {mname} seed {seed} {label:26s} "
                      + " ".join(f"{r['sparsity']:.2f}:{r['test']:.4f}" for r in done)
                      + f" ({time.time() - t0:.0f}s)", flush=True)
                path.write_text(json.dumps(results, indent=1))
    summarize(results, out)


def dense_for(mname: str, cfg: dict, data, seed: int, reference: str):
    """The dense model a seed starts from: the converged reference (one for every seed; the seed then drives
    the pruning and fine-tuning), or a model trained here for ``dense_epochs`` on the training subset."""
    if reference == "converged":
        return refs.load_reference(mname)[0]
    torch.manual_seed(seed)
    dense = create_model(mname, in_channels=1)
    return train(dense, data.x_train, data.y_train, epochs=cfg["dense_epochs"], seed=seed)


def merge(into: dict, other: dict) -> None:
    """Add ``other``'s rows to ``into`` (same protocol: ladder, epochs and training images must agree)."""
    for key in ("ladder", "epochs_per_rung", "train_images"):
        if into[key] != other[key]:
            raise ValueError(f"cannot merge runs with different {key}: {into[key]} vs {other[key]}")
    ours, theirs = into.get("weights", {}), other.get("weights", {})
    for mname in ours.keys() & theirs.keys():
        if ours[mname] != theirs[mname]:
            raise ValueError(f"cannot merge {mname} rows measured from other reference weights: "
                             f"{ours[mname]} vs {theirs[mname]}")
    if ours or theirs:
        into["weights"] = {**theirs, **ours}
    for mname, m in other["models"].items():
        mine = into["models"].setdefault(mname, {"dense_test": {}, "runs": {}, "wall": {}})
        for seed, acc in m["dense_test"].items():
            if seed in mine["dense_test"] and abs(mine["dense_test"][seed] - acc) > 1e-9:
                raise ValueError(f"{mname} seed {seed}: the dense models differ ({mine['dense_test'][seed]} vs {acc})")
            mine["dense_test"][seed] = acc
        mine.setdefault("forward_seconds", m.get("forward_seconds"))
        for part in ("runs", "wall"):
            for label, per_seed in m[part].items():
                mine[part].setdefault(label, {}).update(per_seed)


def paired_vs_best(mres: dict, label: str) -> dict:
    """Per rung: ``label``'s test accuracy minus the best splicing baseline's (best on average over the
    seeds ``label`` ran; only baselines run on all of them), in pp."""
    def test_at(lab, seed, s):
        return {round(r["sparsity"], 2): r["test"] for r in mres["runs"][lab][seed] if r}.get(s)

    seeds = list(mres["runs"][label])
    base = [b for b in mres["runs"] if b.endswith("[splicing]") and all(x in mres["runs"][b] for x in seeds)]
    out = {}
    for s in (0.8, 0.9, 0.95):
        if not base or any(test_at(label, x, s) is None for x in seeds):
            continue
        best = max(base, key=lambda b: np.mean([test_at(b, x, s) for x in seeds]))
        out[s] = 100 * float(np.mean([test_at(label, x, s) - test_at(best, x, s) for x in seeds]))
    return out


def summarize(results: dict, out: Path) -> None:
    lines = []
    for mname, per_seed in results.get("ablation", {}).items():
        lines.append(f"\n## ablation: {mname}, one round to 90% from dense (validation accuracy, mean over seeds)\n")
        lines.append("| setting | val after fine-tune | search's pick (before fine-tune) | search s | wall s | evaluations |")
        lines.append("|---|---|---|---|---|---|")
        for label in ABLATION:
            rs = [per_seed[s][label] for s in per_seed if label in per_seed[s]]
            if rs:
                m = lambda k: np.mean([r[k] for r in rs])  # noqa: E731
                lines.append(f"| {label} | {m('val'):.4f} | {m('val_before_ft'):.4f} | {m('search_seconds'):.0f} | "
                             f"{m('wall_seconds'):.0f} | {int(m('nfev'))} |")
    for mname, mres in results["models"].items():
        if not mres["runs"]:
            continue
        n_layers = len(de_plugin.targets.find_targets(create_model(mname, in_channels=1)))
        lines.append(f"\n## {mname} ({n_layers} pruned layers; dense test {np.mean(list(mres['dense_test'].values())):.4f}, "
                     f"{len(mres['dense_test'])} seed(s), {results['epochs_per_rung']} fine-tune epoch(s) per rung over "
                     f"{results['train_images']} images)\n")
        lines.append("| method | seeds | test drop @80% (pp) | @90% | @95% | compression @<=0.5 pp | @<=1 pp | evals | "
                     "search share of wall | fine-tune steps |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for label, runs in mres["runs"].items():
            d = {s: [] for s in (0.8, 0.9, 0.95)}
            c05, c1, ev, share, st = [], [], [], [], []
            for seed, rows in runs.items():
                dt = mres["dense_test"][seed]
                by = {round(r["sparsity"], 2): r for r in rows if r is not None}
                for s in d:
                    d[s].append(100 * (dt - by[s]["test"]) if s in by else np.nan)
                c05.append(lw.best_compression(rows, dt, 0.005))
                c1.append(lw.best_compression(rows, dt, 0.01))
                last = [r for r in rows if r is not None][-1]
                ev.append(last["nfev"])
                st.append(last["steps"])
                share.append(last["search_seconds"] / mres["wall"][label][seed])
            f = lambda v, p=2: "n/a" if np.all(np.isnan(v)) else f"{np.nanmean(v):.{p}f} ± {np.nanstd(v):.{p}f}"  # noqa
            lines.append(f"| {label} | {len(runs)} | {f(d[0.8])} | {f(d[0.9])} | {f(d[0.95])} | {f(c05, 1)}x | {f(c1, 1)}x | "
                         f"{int(np.mean(ev))} | {100 * np.mean(share):.0f}% | {int(np.mean(st))} |")
        lines.append("\nPaired: each DE row's test accuracy minus the best same-recovery baseline's at that rung (the "
                     "baseline best on average over the seeds the row ran), mean over those seeds, pp:\n")
        for label in mres["runs"]:
            if label.startswith("de_layerwise"):
                lines.append(f"- {label}: " + ", ".join(
                    f"{int(100 * s)}% {v:+.2f}" for s, v in paired_vs_best(mres, label).items()))
        for label, de in mres["runs"].items():
            if not label.startswith("de_layerwise"):
                continue
            ev = np.mean([[r for r in rows if r][-1]["nfev"] for rows in de.values()])
            secs = np.mean([[r for r in rows if r][-1]["search_seconds"] for rows in de.values()])
            lines.append(f"\n{label}: {ev / n_layers:.1f} evaluations per layer over the ladder; "
                         f"{secs / max(ev, 1):.3f} s per evaluation = "
                         f"{secs / max(ev, 1) / mres['forward_seconds']:.2f}x one dense forward over the search's "
                         f"validation subset ({mres['forward_seconds']:.3f} s)")
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    plot(results, out)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, r in results["models"].items() if r["runs"]]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, mname in zip(axes[0], models):
        mres = results["models"][mname]
        for label, per_seed in mres["runs"].items():
            pts = sorted({round(r["sparsity"], 3) for rows in per_seed.values() for r in rows if r})
            drops = [np.mean([100 * (mres["dense_test"][s] - r["test"]) for s, rows in per_seed.items()
                              for r in rows if r and round(r["sparsity"], 3) == p]) for p in pts]
            ax.plot([1 / (1 - p) for p in pts], drops, marker="o", ms=3, label=label)
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("compression (pruned layers)")
        ax.set_ylabel("test accuracy drop (pp)")
        ax.set_title(mname)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "deep.png", dpi=100)


if __name__ == "__main__":
    main()
