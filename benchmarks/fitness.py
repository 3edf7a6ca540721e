"""Which fitness predicts accuracy after fine-tuning? Rank correlations over sampled allocations.

A search ranks allocations by a score taken *before* any training; what the user keeps is the
accuracy *after* fine-tuning. This study measures how well each candidate score predicts it.

For each model's converged reference (``benchmarks/references.py``) and each sparsity (90%, 95%):
allocations that keep exactly the same number of weights (magnitude masks inside each layer):

* the four heuristic seeds (uniform, global magnitude, LAMP, ERK);
* perturbed seeds (each layer's density scaled by exp(N(0, sigma)), sigma 0.1 / 0.3, refit to the
  budget): what a search population starts from;
* level-switch neighbours of the seeds (1-6 EvoPress mutations): what a local search visits;
* uniform random allocations within the layer bounds: the control.

Each candidate is scored by: accuracy, cross-entropy loss and KL divergence of its output
distribution from the reference's (EvoPress's fitness), each with and without adaptive BN (BN
models), each on 500 and on 2,000 validation images; and by one measure after training, accuracy
on the same 2,000 images after the first 10% of the fine-tune (what a selection by short fine-tune
sees). Then every candidate gets the same fine-tune (``references.FINETUNE``, ``--steps``, masks
held), and its accuracy on the 3,000 validation images no score saw is the outcome (the 10,000
test images are recorded beside it).

Reported per model and sparsity: Spearman's rho of each score with the outcome; the regret of
picking by it (the outcome of its top candidate minus the best outcome) and its gain over the best
seed's outcome. Results accumulate per candidate in ``<out>/<model>.json`` (a rerun skips what is
there).

    python benchmarks/fitness.py --models resnet20 --device cuda --out benchmarks/results/fitness
    python benchmarks/fitness.py --summary-only --out benchmarks/results/fitness
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import references as refs  # noqa: E402

from de_plugin.weights import allocation  # noqa: E402
from de_plugin.search.allocator import Allocator, KeepSpace  # noqa: E402
from de_plugin.evaluation import BNState, batch_norms, recalibrate_bn  # noqa: E402
from de_plugin.targets import find_targets, get_param  # noqa: E402

log = logging.getLogger("fitness")
RUNGS = (0.9, 0.95)
SCORE_IMAGES, OUTCOME_FROM = 2000, 2000  # scores read val[:2000]; the outcome val[2000:]
BN_BATCHES, BN_BATCH = 4, 128  # adaptive BN as de_layerwise's default (bn_batches=4)
MAX_LAYER_SPARSITY = 0.995


def candidates(weights: list[torch.Tensor], sparsity: float, per_kind: int, seed: int) -> dict[str, np.ndarray]:
    """Named allocations (keep-counts per layer) with exactly the same total."""
    n = np.array([w.numel() for w in weights], dtype=np.int64)
    keep = allocation.total_keep(n, sparsity)
    min_keep = np.minimum(np.ceil(n * (1 - MAX_LAYER_SPARSITY)).astype(np.int64), n)
    space = KeepSpace(n, min_keep, n, [(0.0, MAX_LAYER_SPARSITY)] * len(n))
    rng = np.random.default_rng(seed)
    out = {name: space.fit(fn([w.float() for w in weights], sparsity), keep)
           for name, fn in allocation.ALLOCATIONS.items()}
    seeds = list(out.values())
    for i in range(per_kind):
        base = seeds[i % len(seeds)]
        sigma = 0.1 if i % 2 == 0 else 0.3
        out[f"perturbed{i}"] = space.fit(base / n * np.exp(rng.normal(0, sigma, len(n))), keep, is_density=True)
    lo, hi = np.zeros(len(n)), np.full(len(n), MAX_LAYER_SPARSITY)
    for i in range(per_kind):
        x = space.to_x(seeds[i % len(seeds)])
        for _ in range(1 + i % 6):
            x = Allocator._level_switch(x, lo, hi, rng)
        out[f"neighbour{i}"] = space.project(x, keep)
    for i in range(per_kind):
        out[f"random{i}"] = space.project(rng.uniform(lo, hi), keep)
    for name, c in out.items():
        assert int(c.sum()) == keep, (name, int(c.sum()), keep)
    return out


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def scores(model, x, y, dense_logp, calib, has_bn: bool) -> dict[str, float]:
    """Every pre-training score of the model as it is now (higher is better: loss and KL negated)."""
    out = {}
    for bn in ([False, True] if has_bn else [False]):
        state = BNState(model) if bn else None
        if bn:
            recalibrate_bn(model, calib, BN_BATCHES)
        logp = F.log_softmax(logits_of(model, x), 1)
        if state is not None:
            state.restore()
        for m in (500, SCORE_IMAGES):
            suffix = f"{'+bn' if bn else ''}@{m}"
            lp, dp, yy = logp[:m], dense_logp[:m], y[:m]
            out[f"accuracy{suffix}"] = float((lp.argmax(1) == yy).float().mean())
            out[f"neg_loss{suffix}"] = -float(F.nll_loss(lp, yy))
            out[f"neg_kl{suffix}"] = -float((dp.exp() * (dp - lp)).sum(1).mean())
    return out


def run_candidate(name, model, data, targets, w0, counts, steps, seed, dense_logp, calib, has_bn) -> dict:
    params = {t.name: get_param(model, t) for t in targets}
    masks = {}
    with torch.no_grad():
        for t, w, k in zip(targets, w0, counts):
            m = allocation.keep_mask(w, int(k))
            params[t.name].copy_(w * m)
            masks[t.name] = m
    bn_state = BNState(model)
    xs, ys = data.x_val[:SCORE_IMAGES], data.y_val[:SCORE_IMAGES]
    row = {"counts": [int(c) for c in counts], "scores": scores(model, xs, ys, dense_logp, calib, has_bn)}
    short = max(1, steps // 10)

    def at(step: int) -> None:
        if step == short:
            row["scores"]["short_finetune@2000"] = refs.accuracy(model, xs, ys)
            model.train()

    held = [(params[k], m) for k, m in masks.items()]
    refs.train_steps(model, data.x_train, data.y_train, steps, refs.FINETUNE[name], seed, schedule="cosine",
                     masks=held, on_step=at)
    row["outcome"] = refs.accuracy(model, data.x_val[OUTCOME_FROM:], data.y_val[OUTCOME_FROM:])
    row["test"] = refs.accuracy(model, data.x_test, data.y_test)
    bn_state.restore()
    return row


def study(name: str, device: str, steps: int, per_kind: int, seed: int, out: Path) -> dict:
    path = out / f"{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {"model": name, "steps": steps, "rungs": {}}
    if res["steps"] != steps:
        raise ValueError(f"{path} holds a study with --steps {res['steps']}; give that, or another --out")
    res["weights"] = refs.check_weights(path, res.get("weights", {}), [name])
    ref, info = refs.load_reference(name)
    data = refs.load_data(name, device)
    model = ref.to(device)
    targets = find_targets(model)
    has_bn = bool(batch_norms(model))
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    w0 = [get_param(model, t).detach().clone() for t in targets]
    dense_logp = F.log_softmax(logits_of(model, data.x_val[:SCORE_IMAGES]), 1)
    calib = [data.x_train[i : i + BN_BATCH] for i in range(0, BN_BATCH * BN_BATCHES, BN_BATCH)]
    res["dense"] = {"val_outcome_images": refs.accuracy(model, data.x_val[OUTCOME_FROM:], data.y_val[OUTCOME_FROM:]),
                    "test": info.get("test"), "layers": len(targets)}
    for s in RUNGS:
        cands = candidates([w.cpu() for w in w0], s, per_kind, seed)
        rung = res["rungs"].setdefault(str(s), {})
        t0 = time.perf_counter()
        for i, (cname, counts) in enumerate(cands.items()):
            if cname in rung:
                continue
            model.load_state_dict(sd0)
            rung[cname] = run_candidate(name, model, data, targets, w0, counts, steps, seed, dense_logp, calib, has_bn)
            log.info("%s %.2f %-12s outcome %.4f (%d/%d, %.0f s)", name, s, cname, rung[cname]["outcome"], i + 1,
                     len(cands), time.perf_counter() - t0)
            path.write_text(json.dumps(res, indent=1))
    return res


def analyse(rung: dict) -> dict[str, dict]:
    names = list(rung)
    outcome = np.array([rung[n]["outcome"] for n in names])
    best_seed = max(rung[n]["outcome"] for n in allocation.ALLOCATIONS if n in rung)
    table = {}
    for key in rung[names[0]]["scores"]:
        v = np.array([rung[n]["scores"][key] for n in names])
        pick = names[int(np.argmax(v))]
        table[key] = {"rho": float(spearmanr(v, outcome).statistic), "pick": pick,
                      "regret_pp": 100 * float(rung[pick]["outcome"] - outcome.max()),
                      "vs_best_seed_pp": 100 * float(rung[pick]["outcome"] - best_seed)}
    return table


def summarize(out: Path) -> str:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
    lines, summary = [], {}
    for name, res in results.items():
        for s, rung in res["rungs"].items():
            if len(rung) < 5:
                continue
            table = analyse(rung)
            summary.setdefault(name, {})[s] = table
            oc = [r["outcome"] for r in rung.values()]
            seeds = {n: rung[n]["outcome"] for n in allocation.ALLOCATIONS if n in rung}
            lines.append(f"\n### {name} at {float(s):.0%}: {len(rung)} allocations, {res['steps']} fine-tune steps; "
                         f"outcome (val accuracy, 3,000 images) {min(oc):.4f}-{max(oc):.4f}; seeds "
                         + ", ".join(f"{k} {v:.4f}" for k, v in seeds.items()) + "\n")
            lines.append("| score | Spearman rho | picks | its outcome - best (pp) | - best seed's (pp) |")
            lines.append("|---|---|---|---|---|")
            for key, t in sorted(table.items(), key=lambda kv: -kv[1]["rho"]):
                lines.append(f"| {key} | {t['rho']:+.3f} | {t['pick']} | {t['regret_pp']:+.2f} | "
                             f"{t['vs_best_seed_pp']:+.2f} |")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    plot(summary, out)
    return text


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(m, s) for m in summary for s in summary[m]]
    if not cells:
        return
    keys = sorted({k for m, s in cells for k in summary[m][s]})
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.6), 4))
    w = 0.8 / len(cells)
    for j, (m, s) in enumerate(cells):
        ax.bar(np.arange(len(keys)) + j * w, [summary[m][s].get(k, {}).get("rho", np.nan) for k in keys], w,
               label=f"{m} {float(s):.0%}")
    ax.set_xticks(np.arange(len(keys)) + 0.4, keys, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Spearman rho with accuracy after fine-tune")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fitness.png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300", "resnet20", "mobilenetv2", "vit"],
                    choices=list(refs.RECIPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300, help="fine-tune steps per candidate (batch 256)")
    ap.add_argument("--per-kind", type=int, default=12, help="perturbed, neighbour and random allocations, each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/fitness")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.summary_only:
        torch.backends.cudnn.benchmark = True
        for name in args.models:
            study(name, args.device, args.steps, args.per_kind, args.seed, out)
    print(summarize(out))


if __name__ == "__main__":
    main()
