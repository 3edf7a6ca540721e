"""One-shot pruning of a causal language model: searched per-layer sparsity against uniform and OWL.

The dense model is :mod:`de_plugin.demo.lm`'s TinyGPT (4 blocks, d=128, byte-level) trained on the
Python standard library's sources (``--steps``, cached); every 10th file is held out. For each seed, the
calibration set is ``--calib-batches`` batches of 8 x 128 tokens drawn from the training files with
that seed; perplexity and KL (from the dense model) are measured on ``--eval-batches`` consecutive
held-out windows of 8 x 128 tokens. Allocations:

* ``uniform``, ``owl``: no search; ``fisher``: the curvature-weighted allocation, no search;
* ``search x4[1 batch, lambda=4]``: ``prune_lm``'s defaults ((1 + 4) level switching, one calibration batch per
  candidate) at 4 x ``--evals``: the same tokens forwarded as ``search``;
* ``search[1 batch, lambda=4]``, ``search[1 batch]``: one batch per candidate at ``--evals`` ((1 + 4), (1 + 8));
* ``search``: EvoPress-style (1 + 8) level switching on ``--search-batches`` per candidate at ``--evals``;
* ``search/4``: the same at a quarter of the evaluations;
* ``de``: differential evolution (population 20) and ``random`` (the control), at ``--evals``;
* ``search[lambda=20]``, ``search[lambda=4]``, ``search/4[lambda=4]``: 20 or 4 offspring per generation instead of 8;
* ``search x4``, ``search x16``: ``search`` at 4 and 16 times ``--evals`` (is it converged?);
* ``search[16 batches]``: ``search`` scoring every candidate on 16 calibration batches;
* ``search[fisher]``, ``search/4[fisher]``: ``search`` with the ``fisher`` allocation as a third start;
* ``uniform[seq]``, ``owl[seq]``, ``search[seq]``: the final model pruned block by block (``sequential=True``).
* ``guided[1 batch, lambda=4]``: ``search_strategy='guided'`` (the level switches a second-order estimate of the
  KL at the parent ranks best, scored one batch each) at ``--evals`` (a quarter of the default's), ``guided
  x4[...]`` at the default's 4 x ``--evals``, ``guided/4[...]`` at a sixteenth.

An evaluation is one forward pass over the search's calibration batches (``--search-batches``); the
finalists' re-scoring on all ``--calib-batches`` counts too, so every search reports a few more.

``--widths``: heads and hidden units removed per block (``prune_width``), uniform width against the
searched one, at those shares of the decoder's Linear parameters, and Torch-Pruning's own LLM-pruner rule
(``tp_uniform``: MetaPruner, group magnitude, one ratio for whole heads and MLP units in every block).

Each with ``magnitude`` / ``wanda`` / ``sparsegpt`` inside layers, at fractional sparsities and 2:4
(N:M fixes every layer at 50%: no allocation to search). Ratios of held-out perplexity are paired over
seeds (geometric mean and 95% t-interval of the log ratio). Cells accumulate in ``<out>/cells.json``.

    python benchmarks/llm.py --sparsities 0.7 --methods wanda --seeds 0 1 2 --out benchmarks/results/llm
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import Cells  # noqa: E402
from tvzoo import SITE  # noqa: E402  (Torch-Pruning lives in .zoo-site, benchmarks only)

from de_plugin.demo.lm import dense_lm, stdlib_corpus, token_batches  # noqa: E402
from de_plugin.lm import DenseReference, perplexity, prune_lm  # noqa: E402
from de_plugin.lm.width import decoder_params, prune_width  # noqa: E402

#: the rows named without ``lambda=`` run (1 + 8) on ``--search-batches`` per candidate; the ``search`` rows are
#: EvoPress-style level switching drawn at random (``search_strategy='evopress'``), the ``guided`` rows rank them by
#: the Taylor estimate. ``prune_lm``'s default on these models is ``guided x4[1 batch, lambda=4]``: (1 + 4) on one
#: calibration batch per candidate at 4 x 208 evaluations; ``DEFAULT`` is its EvoPress-style counterpart (also
#: ``prune_width``'s default)
ROWS_LAMBDA = 8
DEFAULT = "search x4[1 batch, lambda=4]"
GUIDED = "guided x4[1 batch, lambda=4]"
#: every search at the same evaluations (``--evals``), ``search/4`` at a quarter of them
ALLOCATIONS = {"uniform": {"allocation": "uniform"}, "owl": {"allocation": "owl"},
               "search": {}, "search/4": {"share": 0.25},
               "de": {"search_strategy": "de", "population": None},
               "random": {"search_strategy": "random", "population": None},
               "search[lambda=20]": {"population": 20},
               # fewer offspring per generation: more generations for the same evaluations (a quarter budget's question)
               "search[lambda=4]": {"population": 4}, "search/4[lambda=4]": {"population": 4, "share": 0.25},
               # EvoPress's multi-step selection: lambda offspring screened on one calibration batch, the best
               # `survivors` scored on the search batches (screenings counted at their share of an evaluation)
               "screened[16/2]": {"population": 16, "survivors": 2},
               "screened[16/2]/4": {"population": 16, "survivors": 2, "share": 0.25},
               "screened[32/2]": {"population": 32, "survivors": 2},
               "screened[32/2]/4": {"population": 32, "survivors": 2, "share": 0.25},
               "screened[32/4]": {"population": 32, "survivors": 4},
               "screened[32/4]/4": {"population": 32, "survivors": 4, "share": 0.25},
               # the default search given more evaluations: how far it is from converged
               "search x4": {"share": 4.0}, "search x16": {"share": 16.0},
               # the search scoring on all 16 calibration batches (4x the tokens, 4x the cost per evaluation)
               "search[16 batches]": {"search_batches": 16},
               # the final model pruned block by block on the pruned blocks' outputs (the papers' order)
               "uniform[seq]": {"allocation": "uniform", "sequential": True},
               "owl[seq]": {"allocation": "owl", "sequential": True}, "search[seq]": {"sequential": True},
               # the curvature-weighted allocation (diagonal Fisher x squared removed weights), alone and as a
               # third start of the search (its backward passes taken from the search's evaluations)
               "fisher": {"allocation": "fisher"}, "search[fisher]": {"fisher_seed": True},
               "search/4[fisher]": {"fisher_seed": True, "share": 0.25},
               # every candidate scored on one calibration batch: (1 + 8)'s evaluations at a quarter of its tokens
               "search[1 batch]": {"search_batches": 1},
               # and with 4 offspring a generation: twice the generations (a quarter of (1 + 8)'s tokens), and the
               # same at 4x the evaluations ((1 + 8)'s tokens: prune_lm's default)
               "search[1 batch, lambda=4]": {"search_batches": 1, "population": 4},
               "search x4[1 batch, lambda=4]": {"search_batches": 1, "population": 4, "share": 4.0},
               # the guided search (its level switches ranked by a second-order estimate of the KL at the parent) at a
               # quarter of the default's evaluations, at the default's, and at a sixteenth
               "guided[1 batch, lambda=4]": {"search_batches": 1, "population": 4, "search_strategy": "guided"},
               GUIDED: {"search_batches": 1, "population": 4, "search_strategy": "guided",
                                                "share": 4.0},
               "guided/4[1 batch, lambda=4]": {"search_batches": 1, "population": 4, "search_strategy": "guided",
                                               "share": 0.25}}
#: the lines of the plot (the other rows are in the table)
PLOTTED = ("uniform", "owl", "fisher", "random", "de", "search", DEFAULT, "guided[1 batch, lambda=4]", GUIDED)
SEARCHES = tuple(a for a, o in ALLOCATIONS.items() if o.get("allocation", "search") == "search")
#: width: uniform and searched (prune_width), and Torch-Pruning's own uniform rule (MetaPruner, magnitude)
WIDTH_ALLOCATIONS = {"uniform": {"allocation": "uniform"}, "search": {}, "tp_uniform": None,
                     "search x4": {"share": 4.0},  # search x4: is the width search converged?
                     "search[1 batch, lambda=4]": {"search_batches": 1, "population": 4},
                     "search x4[1 batch, lambda=4]": {"search_batches": 1, "population": 4, "share": 4.0}}
#: the rows above without the refit (``prune_width``'s default where it fits in memory), so they stay reproducible;
#: the same with ``refit=True`` (each pruned o / down projection's kept columns and bias re-fitted by least squares)
REFIT = "+refit"
WIDTH_ALLOCATIONS = {a: (o if o is None else {**o, "refit": False}) for a, o in WIDTH_ALLOCATIONS.items()}
#: and with the refit of the final widths only (the search scores without it: ``refit=None``'s choice when the
#: moments would not fit in memory, as on 7B models)
FINAL = "+final"
WIDTH_ALLOCATIONS |= {"uniform" + REFIT: {"allocation": "uniform", "refit": True},
                      DEFAULT + REFIT: {**WIDTH_ALLOCATIONS[DEFAULT], "refit": True},
                      DEFAULT + FINAL: {**WIDTH_ALLOCATIONS[DEFAULT], "refit": "final"}}


def run_cell(model, calib, held, ref_held, method: str, alloc: str, sparsity, seed: int, args) -> dict:
    opts = {k: v for k, v in ALLOCATIONS[alloc].items() if k != "share"}
    if alloc in SEARCHES:
        share = ALLOCATIONS[alloc].get("share", 1.0)
        opts = {"generations": 1000, "search_batches": args.search_batches, "max_evals": int(args.evals * share),
                "population": ROWS_LAMBDA, "search_strategy": "evopress", **opts}
    start = time.perf_counter()
    r = prune_lm(model, calib, sparsity, method=method, seed=seed, progress=False, **opts)
    wall = time.perf_counter() - start
    return {"ppl": perplexity(r.model, held), "kl": ref_held.kl(r.model), "calib_kl": r.fitness,
            "seed_calib_kl": r.seed_fitness, "sparsity": r.sparsity, "evaluations": r.evaluations,
            "wall_seconds": wall, "layer_sparsity": r.layer_sparsity,
            "batches_forwarded": r.search.get("batches_forwarded", 0)}


def run_width(model, calib, held, ref_held, alloc: str, share: float, seed: int, args) -> dict:
    opts = {k: v for k, v in WIDTH_ALLOCATIONS[alloc].items() if k != "share"}
    if opts.get("allocation", "search") == "search":
        evals = int(args.evals * WIDTH_ALLOCATIONS[alloc].get("share", 1.0))
        opts = {"max_evals": evals, "generations": 1000, "search_batches": args.search_batches,
                "population": ROWS_LAMBDA, **opts}
    start = time.perf_counter()
    r = prune_width(model, calib, share, seed=seed, progress=False, **opts)
    wall = time.perf_counter() - start
    return {"ppl": perplexity(r.model, held), "kl": ref_held.kl(r.model), "calib_kl": r.fitness,
            "seed_calib_kl": r.seed_fitness, "removed": r.removed, "heads": r.heads, "units": r.units,
            "evaluations": r.evaluations, "wall_seconds": wall, "batches_forwarded": r.search.get("batches_forwarded", 0)}


def run_width_tp(model, held, ref_held, share: float) -> dict:
    """Torch-Pruning's LLM pruner rule on TinyGPT: MetaPruner, group L2 magnitude, one ratio for the heads
    (whole heads, ``prune_num_heads``) and the MLP hidden units of every block, the residual width kept; the
    ratio bisected to the largest one that removes at most ``share`` of the decoder Linear parameters (whole
    heads make the removed share jump; the baseline is never asked to remove more than the others)."""
    if str(SITE) not in sys.path:
        sys.path.append(str(SITE))
    import torch_pruning as tp

    def pruned(ratio: float):
        m = copy.deepcopy(model)
        heads = {p: b.heads for b in m.blocks for p in (b.q_proj, b.k_proj, b.v_proj)}
        tp.pruner.MetaPruner(m, torch.zeros(1, 16, dtype=torch.long), importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=ratio, head_pruning_ratio=ratio, num_heads=heads, prune_num_heads=True,
                             prune_head_dims=False, ignored_layers=[m.head, m.tok, m.pos]).step()
        for b in m.blocks:  # TinyGPT reshapes by head_dim; the head count follows the sliced projections
            b.heads = b.q_proj.out_features // b.head_dim
        return m

    start, dense = time.perf_counter(), decoder_params(model)
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if 1 - decoder_params(pruned(mid)) / dense > share else (mid, hi)
    m = pruned(lo)
    return {"ppl": perplexity(m, held), "kl": ref_held.kl(m), "removed": 1 - decoder_params(m) / dense, "ratio": lo,
            "heads": [b.heads for b in m.blocks], "units": [b.up_proj.out_features for b in m.blocks],
            "evaluations": 0, "wall_seconds": time.perf_counter() - start}


def width_table(cells: Cells, shares, seeds) -> str:
    lines = ["| parameters removed | allocation | perplexity (mean) | KL held-out | heads kept per block "
             "(seed 0) | hidden units kept per block (seed 0) | wall s |", "|---|---|---|---|---|---|---|"]
    got = {}
    for r in shares:
        for a in WIDTH_ALLOCATIONS:
            cs = {sd: cells.get(("width", r, a, sd)) for sd in seeds}
            cs = {sd: c for sd, c in cs.items() if c}
            if not cs:
                continue
            got[(r, a)] = {sd: c["ppl"] for sd, c in cs.items()}
            first = cs[min(cs)]
            mean = lambda k: sum(c[k] for c in cs.values()) / len(cs)  # noqa: E731
            lines.append(f"| {mean('removed'):.1%} | {a} | {mean('ppl'):.3f} ({len(cs)} seeds) | {mean('kl'):.4f} | "
                         f"{first['heads']} | {first['units']} | {mean('wall_seconds'):.0f} |")
    lines += [""] + [f"- width @{r}: {a} / {b} = {fmt(ratio(got[(r, a)], got[(r, b)]))}"
                     for r in shares for a, b in (("search", "uniform"), ("search", "tp_uniform"), ("uniform", "tp_uniform"),
                                                  ("search x4", "search"), ("search x4", "uniform"),
                                                  ("search[1 batch, lambda=4]", "search"), (DEFAULT, "search"),
                                                  (DEFAULT, "uniform"), ("uniform" + REFIT, "uniform"),
                                                  (DEFAULT + REFIT, "uniform" + REFIT), (DEFAULT + REFIT, "uniform"),
                                                  (DEFAULT + REFIT, DEFAULT), (DEFAULT + REFIT, "tp_uniform"),
                                                  (DEFAULT + FINAL, "uniform" + REFIT), (DEFAULT + FINAL, DEFAULT + REFIT),
                                                  (DEFAULT + FINAL, "uniform"))
                     if (r, a) in got and (r, b) in got]
    return "\n".join(lines)


def plot(cells: Cells, methods, rungs, allocs, seeds, dense_ppl: float, path: Path) -> None:
    """Mean held-out perplexity against sparsity, one panel per in-layer method, one line per allocation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fracs = [r for r in rungs if r != "2:4"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for a in allocs:
            pts = [(r, [cells.get((m, r, a, sd)) for sd in seeds]) for r in fracs]
            pts = [(r, [c["ppl"] for c in cs if c]) for r, cs in pts]
            pts = [(r, sum(v) / len(v)) for r, v in pts if v]
            if pts:
                ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=a)
        ax.axhline(dense_ppl, color="grey", ls=":", label="dense")
        ax.set(title=f"{m} inside layers", xlabel="sparsity", ylabel="held-out perplexity")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio(a: dict, b: dict) -> dict:
    """Geometric-mean ratio a / b over shared seeds with a 95% t-interval (log scale)."""
    seeds = sorted(set(a) & set(b))
    logs = [math.log(a[s] / b[s]) for s in seeds]
    n = len(logs)
    if n == 0:
        return {"n": 0}
    mean = sum(logs) / n
    if n < 2:
        return {"n": n, "ratio": math.exp(mean), "low": None, "high": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"n": n, "ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half)}


def fmt(r: dict) -> str:
    if not r.get("n"):
        return "-"
    if r["low"] is None:
        return f"{r['ratio']:.3f}x (1 seed, illustration)"
    return f"{r['ratio']:.3f}x [{r['low']:.3f}, {r['high']:.3f}] ({r['n']} seeds)"


#: the ratios the table lists (numerator, denominator), where both were measured
PAIRS = [("search", "owl"), ("search", "uniform"), ("search", "de"), ("search", "random"),
         ("search/4", "search"), ("search/4", "owl"), ("de", "owl"), ("owl", "uniform"),
         ("search", "search[lambda=20]"), (DEFAULT, "owl"), (DEFAULT, "search"),
         ("search[1 batch, lambda=4]", DEFAULT), ("search[1 batch, lambda=4]", "search"),
         ("search[1 batch]", "search"), ("fisher", "owl"), ("fisher", "uniform"),
         ("search[fisher]", "search"), ("search/4[fisher]", "search/4"),
         # the guided search: at a quarter of the default's evaluations and at the same, against the default and OWL
         ("guided[1 batch, lambda=4]", DEFAULT), (GUIDED, DEFAULT),
         ("guided[1 batch, lambda=4]", "search[1 batch, lambda=4]"), ("guided/4[1 batch, lambda=4]", DEFAULT),
         ("guided[1 batch, lambda=4]", "owl"), (GUIDED, "owl"), (GUIDED, "uniform")]


def ratio_lines(got: dict, methods, rungs, pairs) -> list[str]:
    """One line per (method, rung, pair) measured on both sides: the paired held-out perplexity ratio."""
    return [f"- {m} @{s}: {a} / {b} = {fmt(ratio(got[(m, s, a)], got[(m, s, b)]))}"
            for m in methods for s in rungs for a, b in pairs if (m, s, a) in got and (m, s, b) in got]


def table(cells: Cells, methods, rungs, allocs, seeds, dense_ppl: float) -> str:
    lines = [f"dense held-out perplexity {dense_ppl:.3f}", "",
             "| inside layers | sparsity | allocation | perplexity (mean) | KL held-out | evaluations | wall s |",
             "|---|---|---|---|---|---|---|"]
    got = {}
    for m in methods:
        for s in rungs:
            for a in (allocs if s != "2:4" else ["uniform"]):
                cs = {sd: cells.get((m, s, a, sd)) for sd in seeds}
                cs = {sd: c for sd, c in cs.items() if c}
                if not cs:
                    continue
                got[(m, s, a)] = {sd: c["ppl"] for sd, c in cs.items()}
                mean = lambda k: sum(c[k] for c in cs.values()) / len(cs)  # noqa: E731
                lines.append(f"| {m} | {s} | {a} | {mean('ppl'):.3f} ({len(cs)} seeds) | {mean('kl'):.4f} | "
                             f"{mean('evaluations'):.0f} | {mean('wall_seconds'):.0f} |")
    lines += ["", "Held-out perplexity ratios, paired over seeds:", ""]
    lines += ratio_lines(got, methods, [r for r in rungs if r != "2:4"], PAIRS)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="dense training steps (cached)")
    ap.add_argument("--shape", default="", help="another TinyGPT than the default (d=128, 4 blocks, 4 heads), as "
                                                "TinyGPT keywords, e.g. 'd=96,layers=6' (a second test bed)")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--sparsities", nargs="*", default=["0.5", "0.6", "0.7", "2:4"])
    ap.add_argument("--widths", nargs="*", type=float, default=[], help="shares of parameters removed by width")
    ap.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=list(ALLOCATIONS))
    ap.add_argument("--width-allocations", nargs="+", default=list(WIDTH_ALLOCATIONS), choices=list(WIDTH_ALLOCATIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--search-batches", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--evals", type=int, default=208, help="search evaluations (the default search's 8 x 26)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/llm")
    ap.add_argument("--table-only", action="store_true", help="compute nothing: the table, plot and summary of every "
                                                                "cell in <out>/cells.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table_only:
        return write_outputs(*stored(Path(args.out)), Path(args.out))
    torch.set_num_threads(args.threads)
    corpus = stdlib_corpus()
    shape = {k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(",") if kv)}
    model = dense_lm(steps=args.steps, seed=0, corpus=corpus, **shape)
    held = token_batches(corpus.heldout, 8, 128, args.eval_batches, contiguous=True)
    ref_held = DenseReference(model, held)
    dense_ppl = perplexity(model, held)
    out = Path(args.out)
    cells = Cells(out / "cells.json", {"steps": args.steps, **({"shape": shape} if shape else {}),
                                       "calib_batches": args.calib_batches,
                                       "search_batches": args.search_batches, "eval_batches": args.eval_batches,
                                       "evals": args.evals, "dense_ppl": round(dense_ppl, 4)})
    rungs = [s if s == "2:4" else float(s) for s in args.sparsities]
    for seed in args.seeds:
        calib = token_batches(corpus.train, 8, 128, args.calib_batches, seed=1000 + seed)
        for s in rungs:
            for m in args.methods:
                for a in (args.allocations if s != "2:4" else ["uniform"]):
                    logging.info("cell %s @%s %s seed %d", m, s, a, seed)
                    cells.run((m, s, a, seed), lambda: run_cell(model, calib, held, ref_held, m, a, s, seed, args))
        for r in args.widths:
            for a in args.width_allocations:
                logging.info("cell width %s %s seed %d", r, a, seed)
                cells.run(("width", r, a, seed), lambda: run_width_tp(model, held, ref_held, r) if a == "tp_uniform"
                          else run_width(model, calib, held, ref_held, a, r, seed, args))
    write_outputs(cells, args.methods, rungs, args.allocations, args.widths, args.seeds, dense_ppl, out)


def stored(out: Path) -> tuple:
    """Everything ``<out>/cells.json`` holds, in the order the tables use: (cells, methods, rungs, allocations,
    widths, seeds, dense perplexity)."""
    protocol = json.loads((out / "cells.json").read_text())["protocol"]
    cells = Cells(out / "cells.json", protocol)
    keys = [k.split("|") for k in cells.cells]
    lm = [k for k in keys if k[0] != "width"]
    methods = [m for m in ("magnitude", "wanda", "sparsegpt") if any(k[0] == m for k in lm)]
    rungs = sorted({float(k[1]) for k in lm if k[1] != "2:4"}) + (["2:4"] if any(k[1] == "2:4" for k in lm) else [])
    allocs = [a for a in ALLOCATIONS if any(k[2] == a for k in lm)]
    widths = sorted({float(k[1]) for k in keys if k[0] == "width"})
    seeds = sorted({int(k[3]) for k in keys})
    return cells, methods, rungs, allocs, widths, seeds, protocol["dense_ppl"]


def write_outputs(cells: Cells, methods, rungs, allocs, widths, seeds, dense_ppl: float, out: Path) -> None:
    """``table.md`` (printed too), ``perplexity.png`` (the main allocations) and ``summary.json``."""
    text = table(cells, methods, rungs, allocs, seeds, dense_ppl)
    if widths:
        text += "\n\nWidth (heads and hidden units):\n\n" + width_table(cells, widths, seeds)
    print(text)
    (out / "table.md").write_text(text + "\n")
    if any(r != "2:4" for r in rungs):
        plot(cells, methods, rungs, [a for a in PLOTTED if a in allocs], seeds, dense_ppl, out / "perplexity.png")
    (out / "summary.json").write_text(json.dumps({"dense_ppl": dense_ppl, "cells": len(cells.cells)}, indent=1))


if __name__ == "__main__":
    main()
