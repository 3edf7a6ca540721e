"""How de_layerwise chooses its allocation: held-out accuracy vs a short fine-tune of every finalist.

One round from a converged reference (``benchmarks/references.py``) to each sparsity, then the same
fine-tune for every method (the reference's ``FINETUNE`` recipe, cosine schedule, ``--epochs`` of
``--epoch-steps`` batches of 256), test accuracy on all 10,000 test images:

* ``lamp`` / ``global_magnitude``: the strongest heuristic allocations, pruned and fine-tuned alike;
* ``de_layerwise[holdout]``: the defaults (the search scores 500 validation images; its 4 best and
  every seed allocation are compared on the other 4,500);
* ``de_layerwise[finetune]``: the same finalists each retrained for one epoch first
  (``selection="finetune"``), their cost counted in the wall time; ``[...,trained-bn]``: a variant with its
  finalists scored on the BatchNorm statistics their retraining left (``finalist_adaptive_bn=False``).

Paired differences over seeds (the seed drives the search and the fine-tune's batches) with 95%
t-intervals. Results accumulate per (model, seed, method, sparsity) cell in ``<out>/cells.json``.

    python benchmarks/selection.py --models lenet300 --seeds 0 1 2 --out benchmarks/results/selection
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import references as refs  # noqa: E402
from cells import Cells  # noqa: E402
from paired import fmt, paired  # noqa: E402

import de_plugin  # noqa: E402

METHODS = {
    "lamp": ("lamp", {}),
    "global_magnitude": ("global_magnitude", {}),
    "de_layerwise[holdout]": ("de_layerwise", {"selection": "holdout"}),
    "de_layerwise[finetune]": ("de_layerwise", {"selection": "finetune", "finalist_epochs": 1}),
    "erk": ("erk", {}),
    # the short fine-tune also given the four best seeds (one epoch each), not only the best one
    "de_layerwise[finetune+seeds]": ("de_layerwise", {"selection": "finetune", "finalist_epochs": 1,
                                                      "finalist_seeds": 4}),
    # the search strategies at DE's number of evaluations, chosen the same way (the short fine-tune)
    # a search allocation must beat the best retrained seed by half a point after the short fine-tune
    "de_layerwise[finetune+margin]": ("de_layerwise", {"selection": "finetune", "finalist_epochs": 1,
                                                       "selection_margin": 0.005}),
    # the finalists (and the four best seeds) retrained for the whole fine-tune (2 epochs, the ResNet-20 protocol's
    # --epochs): the selection then compares what each allocation ends at, on validation data
    "de_layerwise[full-finalists]": ("de_layerwise", {"selection": "finetune", "finalist_epochs": 2,
                                                      "finalist_seeds": 4}),
    "de_layerwise[random]": ("de_layerwise", {"selection": "finetune", "finalist_epochs": 1,
                                              "search_strategy": "random"}),
    "de_layerwise[evopress]": ("de_layerwise", {"selection": "finetune", "finalist_epochs": 1,
                                                "search_strategy": "evopress"}),
}
#: each short-fine-tune variant with its finalists scored on the BatchNorm statistics their retraining left
#: (``finalist_adaptive_bn=False``) instead of statistics re-estimated as the search's (the default)
METHODS.update({f"{m[:-1]},trained-bn]": (p, {**o, "finalist_adaptive_bn": False})
                for m, (p, o) in list(METHODS.items()) if o.get("selection") == "finetune"})
HEURISTICS = ["lamp", "global_magnitude", "erk"]
#: (A, B) pairs reported besides each searched method against the best heuristic at the rung
PAIRS = [("de_layerwise[finetune]", "de_layerwise[holdout]"), ("de_layerwise[full-finalists]", "de_layerwise[finetune]"),
         ("de_layerwise[finetune+margin]", "de_layerwise[finetune]"), ("de_layerwise[finetune+seeds]", "de_layerwise[finetune]"), ("de_layerwise[finetune]", "de_layerwise[random]"),
         ("de_layerwise[finetune]", "de_layerwise[evopress]"), ("de_layerwise[evopress]", "de_layerwise[random]"),
         ("de_layerwise[finetune]", "de_layerwise[finetune,trained-bn]")]


def make_finetune(name: str, data, epoch_steps: int, seed: int):
    """finetune(model, epochs): ``epochs x epoch_steps`` steps of the reference's fine-tune recipe; every call
    draws the same batches for the same seed (so finalists and methods are compared on equal terms)."""
    def finetune(model, epochs: int) -> None:
        steps = int(epochs) * epoch_steps
        if steps > 0:
            refs.train_steps(model, data.x_train, data.y_train, steps, refs.FINETUNE[name], seed, schedule="cosine")
    return finetune


def run_cell(name: str, ref, data, method: str, sparsity: float, seed: int, epochs: int, epoch_steps: int) -> dict:
    pruner, opts = METHODS[method]
    val = [(data.x_val[i:i + 250], data.y_val[i:i + 250]) for i in range(0, len(data.y_val), 250)]
    calib = [data.x_train[i:i + 128] for i in range(0, 128 * 8, 128)]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    extra = {"rounds": 1, "recovery": "none", **({"train_data": calib} if pruner == "de_layerwise" else {})}
    r = de_plugin.prune(copy.deepcopy(ref), pruner, val_data=val, finetune=make_finetune(name, data, epoch_steps, seed),
                        sparsity=sparsity, finetune_epochs=epochs, seed=seed, progress=False, **extra, **opts)
    de = (r.history[0].get("de") or {}) if r.history else {}
    return {"test": refs.accuracy(r.model, data.x_test, data.y_test), "sparsity": r.sparsity,
            "wall_seconds": time.perf_counter() - t0, "nfev": r.nfev,
            "selection_seconds": de.get("selection_seconds", 0.0),
            "chosen": next((s["source"] for s in de.get("selection", []) if s["chosen"]), None),
            "finalists": [{"source": s["source"], "score": s["score"], "chosen": s["chosen"],
                           "after": s.get("score_after_short_finetune")} for s in de.get("selection", [])]}


def stored(cells: Cells) -> tuple[list[str], list[int], list[float]]:
    """The models, seeds and sparsities the file holds cells for: the summary covers the whole study, not the
    share one run measured (runs over different seeds write to one file side by side)."""
    parts = [p for p in cells.parts() if len(p) == 4]
    return (list(dict.fromkeys(p[0] for p in parts)), sorted({int(p[1]) for p in parts}),
            sorted({float(p[3]) for p in parts}))


def table(cells: Cells, models: list[str], seeds: list[int], rungs: list[float]) -> str:
    lines = []
    for name in models:
        lines.append(f"\n### {name}\n\n| method | " + " | ".join(f"test @{s:.0%}" for s in rungs) + " | wall s |")
        lines.append("|---|" + "---|" * (len(rungs) + 1))
        got = {m: {s: {sd: cells.get((name, sd, m, s)) for sd in seeds} for s in rungs} for m in METHODS}
        for m in [m for m in METHODS if any(c for s in rungs for c in got[m][s].values())]:
            accs = [[c["test"] for c in got[m][s].values() if c] for s in rungs]
            walls = [c["wall_seconds"] for s in rungs for c in got[m][s].values() if c]
            lines.append(f"| {m} | " + " | ".join(f"{100 * sum(a) / len(a):.2f} ({len(a)})" if a else "n/a"
                                                   for a in accs) + f" | {sum(walls) / max(1, len(walls)):.0f} |")
        lines.append("\nPaired (pp, mean [95% interval], seeds):\n")
        lines += [f"- {a} - {b} @{s:.0%}: {fmt(p)}" for a, b, s, p in comparisons(got, rungs)]
    return "\n".join(lines)


def comparisons(got: dict, rungs: list[float]) -> list[tuple[str, str, float, dict]]:
    """Each searched method against each heuristic, then ``PAIRS``; only pairs with common seeds."""
    searched = [m for m in METHODS if m not in HEURISTICS]
    out = []
    for a, b in [(a, h) for a in searched for h in HEURISTICS] + PAIRS:
        for s in rungs:
            pa = {sd: c["test"] for sd, c in got[a][s].items() if c}
            pb = {sd: c["test"] for sd, c in got[b][s].items() if c}
            if set(pa) & set(pb):
                out.append((a, b, s, paired(pa, pb)))
    return out


def protocol_of(args) -> dict:
    """What every cell of one results file shares; a run under another protocol is refused (``Cells``)."""
    protocol = {"epochs": args.epochs, "epoch_steps": args.epoch_steps, "finetune": refs.FINETUNE,
                "references": {m: refs.identity(m) for m in args.models}}
    if args.channels_last:
        protocol["layout"] = "channels_last"
    return protocol


def run_model(cells: Cells, name: str, args) -> None:
    """Every (seed, sparsity, method) cell of one model that the file does not hold yet."""
    ref, _ = refs.load_reference(name)
    if args.channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    data = refs.load_data(name)
    for seed in args.seeds:
        for s in args.sparsities:
            for m in args.methods:
                c = cells.run((name, seed, m, s), lambda: run_cell(name, ref, data, m, s, seed, args.epochs,
                                                                  args.epoch_steps))
                print(f"{name} seed {seed} {s:.2f} {m:24s} test {c['test']:.4f} ({c['wall_seconds']:.0f} s, "
                      f"chosen {c['chosen']})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300"], choices=list(refs.RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--epochs", type=int, default=2, help="fine-tune epochs after the round (every method)")
    ap.add_argument("--epoch-steps", type=int, default=100, help="batches of 256 per fine-tune epoch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true",
                    help="convolutions in channels-last layout (MobileNetV2's depthwise convolutions train about "
                         "1.5x faster on a CPU); recorded in the protocol, so cells of one layout are not mixed "
                         "with the other's")
    ap.add_argument("--out", default="benchmarks/results/selection")
    ap.add_argument("--summary-only", action="store_true", help="re-make summary.md from --out's cells.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.summary_only:
        cells = Cells.stored(out / "cells.json")
    else:
        cells = Cells(out / "cells.json", protocol_of(args))
        for name in args.models:
            run_model(cells, name, args)
    text = table(cells, *stored(cells))
    print(text)
    (out / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
