"""``de_layerwise`` at its defaults on a model and data none of its defaults were chosen on, as a new user runs it.

Three models written here (none of them one of ``de_plugin.demo``'s): ``--model resnet``, a residual CNN (22
prunable layers, 3 stages of 3 basic blocks with 1x1 projection shortcuts), ``--model vit``, a pre-norm vision
transformer (26 prunable Linear layers: a 2x2-patch embedding, 4 blocks of separate q / k / v / output
projections and a two-layer MLP, the head), and ``--model mobilenet``, a MobileNetV2-style CNN (23 prunable
layers: 7 inverted-residual blocks with depthwise 3x3 and 1x1 expansion / projection convolutions), on
scikit-learn's 8x8 digits (1,797 images: 1,097 to train, 300 to
validate, 400 to test, split by seed). Per seed the dense model is trained to convergence, then pruned from
dense to each rung in 3 prune / fine-tune rounds with the library's defaults (``de_layerwise``: splicing
recovery, the short-fine-tune selection of the round's allocation) and, as the baselines with the same
recovery and fine-tune, LAMP, ERK and global magnitude, through the same ``de_plugin.prune`` call:

    de_plugin.prune(model, METHOD, evaluate=val_accuracy, finetune=finetune, sparsity=S, rounds=3,
                    finetune_epochs=3, recovery="splicing", train_data=train_batches, seed=SEED)

Test accuracy on the 400 test images; every comparison paired seed by seed against the best heuristic at
that rung (mean difference with its 95% t-interval). ``--methods`` may add the control searches at DE's
evaluation budget (``de_layerwise[random]``: the seeds, then uniform random allocations; ``de_layerwise[evopress]``:
(1 + lambda) level switching; both spend the whole budget, where DE's stall stop leaves most of it unspent) and
``de_layerwise[random, equal evaluations]`` (random allocations held to the evaluations the default spent in the
same seed and rung), each chosen by the same selection, ``de_layerwise[no fallback]`` (the
selection always by the short fine-tune's scores, ``selection_fallback=False``), ``de_layerwise[every seed]``
(every seed allocation retrained as a finalist, not only the best one) and ``de_layerwise[look-ahead]`` (each
finalist also scored one round further, ``selection_lookahead=True``). Cells (seed, method, rung) accumulate in
``<out>/cells.json``: a rerun computes only the missing ones. ``--finalist-bn as-trained`` scores the
default's retrained finalists on the BatchNorm statistics their retraining left (``finalist_adaptive_bn=False``;
recorded in the protocol, so its cells never mix with the default's).

    python benchmarks/unseen.py --seeds 0 1 2 3 4 5 6 7 8 9   # benchmarks/results/unseen_bn
    python benchmarks/unseen.py --model vit --seeds 0 1 2 3 4 5 6 7 8 9 --out benchmarks/results/unseen_vit
    python benchmarks/unseen.py --model mobilenet --seeds 0 1 2 3 4 5 6 7 8 9   # benchmarks/results/unseen_mobilenet_bn
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import Cells  # noqa: E402
from paired import fmt, paired, strongest  # noqa: E402

import de_plugin  # noqa: E402
from de_plugin.demo.data import load_digits_dataset  # noqa: E402
from de_plugin.demo.deep import InvertedResidual  # noqa: E402  (MobileNetV2's block)
from de_plugin.demo.training import make_evaluate, make_finetune  # noqa: E402

#: the random control held to the evaluations the default spent in the same seed and rung (its ``max_evals``); the
#: other controls get DE's nominal budget, which DE's stall stop leaves about two thirds unspent
EQUAL_RANDOM = "de_layerwise[random, equal evaluations]"
#: name -> (pruner, options beyond the shared call); the controls search at DE's evaluation budget
METHODS = {"de_layerwise": ("de_layerwise", {}), "lamp": ("lamp", {}), "erk": ("erk", {}),
           "global_magnitude": ("global_magnitude", {}),
           "de_layerwise[no fallback]": ("de_layerwise", {"selection_fallback": False}),
           "de_layerwise[random]": ("de_layerwise", {"search_strategy": "random"}),
           EQUAL_RANDOM: ("de_layerwise", {"search_strategy": "random"}),
           "de_layerwise[evopress]": ("de_layerwise", {"search_strategy": "evopress"}),
           "de_layerwise[every seed]": ("de_layerwise", {"finalist_seeds": 64}),
           "de_layerwise[look-ahead]": ("de_layerwise", {"selection_lookahead": True})}
HEURISTICS = ["lamp", "erk", "global_magnitude"]
#: the default against each variant, seed by seed: without the selection's fallback, and the control searches
CONTROLS = ["de_layerwise[no fallback]", "de_layerwise[random]", EQUAL_RANDOM, "de_layerwise[evopress]",
            "de_layerwise[every seed]", "de_layerwise[look-ahead]"]
PROTOCOL = {"data": "sklearn digits, 1097 / 300 / 400", "rounds": 3, "finetune_epochs": 3,
            "batch": 64, "lr_finetune": 5e-4, "recovery": "splicing", "calibration_batches": 4}


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual add (a 1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class DigitsResNet(nn.Module):
    """A user's residual CNN for 8x8 digits: stem, 3 stages (8x8, 4x4, 2x2) of 3 blocks, pooled linear head;
    22 prunable layers (19 3x3 convolutions, 2 shortcuts, the head)."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(3):
                blocks.append(Block(c, w, 2 if i > 0 and j == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with separate q / k / v / output Linear layers (four prunable targets)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.o(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Encoder(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each on a residual path."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    """A user's vision transformer for 8x8 digits: 2x2 patches (16 tokens) embedded by a Linear layer, learned
    positions, 4 blocks of width 64 (4 heads, MLP 128), mean-pooled tokens, a Linear head; 26 prunable layers."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128, patch: int = 2):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, (8 // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[Encoder(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        tokens = x.unfold(2, p, p).unfold(3, p, p).reshape(x.shape[0], -1, p * p)
        return self.head(self.norm(self.blocks(self.embed(tokens) + self.pos)).mean(1))


class DigitsMobileNet(nn.Module):
    """A user's MobileNetV2-style CNN for 8x8 digits: a 3x3 stem, 7 inverted-residual blocks (8x8, 4x4, 2x2;
    expansion 4 after the first), a 1x1 convolution to 256 channels, a pooled Linear head; 23 prunable layers,
    7 of them depthwise."""

    #: (expansion, output channels, stride) per block
    CONFIG = ((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 40, 2), (4, 40, 1), (4, 64, 1), (4, 64, 1))

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        blocks, c = [], 16
        for t, c_out, stride in self.CONFIG:
            blocks.append(InvertedResidual(c, c_out, stride, t))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(c, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6())
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))).mean((2, 3)))


#: --model: the class, its dense recipe (each model's own: Adam with cosine decay trains the ResNet, the transformer
#: needs AdamW's decoupled weight decay and a warm-up, here one-cycle, to train reliably on 1,097 images), the
#: default results folder
CNN_RECIPE = {"opt": "adam", "lr": 2e-3, "wd": 1e-4, "schedule": "cosine", "epochs": 60}
MODELS = {"resnet": (DigitsResNet, CNN_RECIPE, "benchmarks/results/unseen_bn"),
          "vit": (DigitsViT, {"opt": "adamw", "lr": 8e-3, "wd": 0.05, "schedule": "onecycle", "epochs": 100},
                  "benchmarks/results/unseen_vit"),
          "mobilenet": (DigitsMobileNet, CNN_RECIPE, "benchmarks/results/unseen_mobilenet_bn")}


def dense_model(data, seed: int, model_name: str = "resnet") -> nn.Module:
    """Trained to convergence on the training split with the model's recipe (``MODELS``), seeded."""
    cls, recipe, _ = MODELS[model_name]
    torch.manual_seed(seed)
    model = cls()
    opt = (torch.optim.Adam if recipe["opt"] == "adam" else torch.optim.AdamW)(
        model.parameters(), lr=recipe["lr"], weight_decay=recipe["wd"])
    total = recipe["epochs"] * -(-len(data.y_train) // PROTOCOL["batch"])
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if recipe["schedule"] == "cosine"
             else torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=total))
    model.train()
    for _ in range(recipe["epochs"]):
        perm = torch.randperm(len(data.y_train))
        for i in range(0, len(perm), PROTOCOL["batch"]):
            idx = perm[i:i + PROTOCOL["batch"]]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def run_cell(dense: nn.Module, data, method: str, sparsity: float, seed: int, max_evals: int | None = None,
             finalist_bn: str = "re-estimated") -> dict:
    """One method pruned from dense to ``sparsity`` as the module docstring's call does; test accuracy after.
    ``max_evals``: the search's evaluations over all rounds (the equal-evaluations control); ``finalist_bn``
    'as-trained': ``de_layerwise``'s finalists scored on the BatchNorm statistics their retraining left."""
    val_accuracy = make_evaluate(data.x_val, data.y_val)
    finetune = make_finetune(data.x_train, data.y_train, lr=PROTOCOL["lr_finetune"], batch_size=PROTOCOL["batch"])
    calib = [data.x_train[i:i + PROTOCOL["batch"]] for i in range(0, PROTOCOL["batch"] * PROTOCOL["calibration_batches"],
                                                                  PROTOCOL["batch"])]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    pruner, options = METHODS[method]
    options = {**options, **({} if max_evals is None else {"max_evals": max_evals}),
               **({"finalist_adaptive_bn": False} if finalist_bn == "as-trained" and pruner == "de_layerwise" else {})}
    r = de_plugin.prune(copy.deepcopy(dense), pruner, evaluate=val_accuracy, finetune=finetune, sparsity=sparsity,
                        rounds=PROTOCOL["rounds"], finetune_epochs=PROTOCOL["finetune_epochs"],
                        recovery=PROTOCOL["recovery"], train_data=calib, seed=seed, progress=False, **options)
    chosen = [next((s["source"] for s in (h.get("de") or {}).get("selection", []) if s["chosen"]), None)
              for h in r.history]
    return {"test": make_evaluate(data.x_test, data.y_test)(r.model), "val": val_accuracy(r.model),
            "sparsity": r.sparsity, "wall_seconds": time.perf_counter() - t0, "nfev": r.nfev,
            "finetune_steps": finetune.steps, "chosen": chosen,
            "fallback": [(h.get("de") or {}).get("selection_fallback_used") for h in r.history]}


def summary(cells: Cells, seeds: list[int], rungs: list[float]) -> tuple[str, dict]:
    """The mean table, and each rung's paired difference against its best heuristic (the one it leads least)."""
    got = {m: {s: {sd: c["test"] for sd in seeds if (c := cells.get((sd, m, s)))} for s in rungs} for m in METHODS}
    lines = ["| method | " + " | ".join(f"test @{s:.0%}" for s in rungs) + " |", "|---|" + "---|" * len(rungs)]
    for m in [m for m in METHODS if any(got[m].values())]:  # the methods this study measured
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * sum(v.values()) / len(v):.2f} ({len(v)})" if (v := got[m][s]) else "n/a" for s in rungs) + " |")
    out: dict = {}
    lines.append("\nde_layerwise - the best heuristic at each rung (pp, paired over seeds):\n")
    for s in rungs:
        found = strongest({h: paired(got["de_layerwise"][s], got[h][s]) for h in HEURISTICS})
        if found is None:
            continue
        best, p = found
        out[str(s)] = {"best_heuristic": best, **p}
        chosen = [cells.get((sd, "de_layerwise", s))["chosen"] for sd in p["seeds"]]
        lines.append(f"- {s:.0%}: vs {best}: {fmt(p)}; allocations chosen per round: {chosen}")
    for c in CONTROLS:
        for s in rungs:
            if got[c][s] and got["de_layerwise"][s]:
                p = paired(got["de_layerwise"][s], got[c][s])
                evals = [sum(n) / len(n) for m in ("de_layerwise", c)
                         if (n := [cells.get((sd, m, s))["nfev"] for sd in p["seeds"]])]
                out[f"{s}|{c}"] = {**p, "mean_evaluations": evals}
                lines.append(f"- {s:.0%}: de_layerwise - {c}: {fmt(p)}; mean evaluations {evals[0]:.0f} / {evals[1]:.0f}")
    return "\n".join(lines), out


def plot(cells: Cells, seeds: list[int], rungs: list[float], path: Path, title: str) -> None:
    """Each method's mean test accuracy against sparsity, with every seed's value as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for k, m in enumerate(["de_layerwise", *HEURISTICS]):
        pts = [(s, [c["test"] for sd in seeds if (c := cells.get((sd, m, s)))]) for s in rungs]
        pts = [(s, v) for s, v in pts if v]
        if not pts:
            continue
        line, = ax.plot([s for s, _ in pts], [100 * sum(v) / len(v) for _, v in pts], marker="o", label=m)
        for s, v in pts:  # seeds side by side, a little apart per method
            ax.scatter([s + 0.003 * (k - 1.5)] * len(v), [100 * x for x in v], s=8, alpha=0.35, color=line.get_color())
    ax.set(xlabel="sparsity", ylabel="test accuracy (%)", title=f"{title}, sklearn digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_dense(cells: Cells, seed: int, test: float) -> None:
    """Store the seed's dense test accuracy, or check it against the stored one: cells added later must start
    from the same dense weights (training is seeded, but another thread count or torch build may differ)."""
    stored = cells.run((seed, "dense", 0.0), lambda: {"test": test})["test"]
    if stored != test:
        raise RuntimeError(f"seed {seed}: the dense model trained now scores {test:.4f} on the test images, the "
                           f"stored cells started from one scoring {stored:.4f}; run with the same --threads and "
                           "torch build, or give another --out")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    ap.add_argument("--methods", nargs="+", default=list(METHODS)[:4], choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="resnet", choices=list(MODELS))
    ap.add_argument("--out", default=None, help="default: the model's folder in MODELS")
    ap.add_argument("--finalist-bn", default="re-estimated", choices=["re-estimated", "as-trained"],
                    help="how de_layerwise's retrained finalists are scored: BatchNorm statistics re-estimated as the "
                         "search's (the default), or as their short retraining left them (finalist_adaptive_bn=False); "
                         "recorded in the protocol")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cls, recipe, folder = MODELS[args.model]
    out = Path(args.out or folder)
    cells = Cells(out / "cells.json", {**PROTOCOL, "model": cls.__name__, "dense": recipe, "finalist_bn": args.finalist_bn})
    for seed in args.seeds:
        data = load_digits_dataset(val_size=300, test_size=400, seed=seed)
        dense = None
        for s in args.sparsities:
            for m in args.methods:
                if (seed, m, s) in cells:
                    continue
                if dense is None:
                    dense = dense_model(data, seed, args.model)
                    check_dense(cells, seed, make_evaluate(data.x_test, data.y_test)(dense))
                budget = None
                if m == EQUAL_RANDOM:  # the default's own cell first: its evaluations are this control's budget
                    budget = cells.run((seed, "de_layerwise", s), lambda: run_cell(dense, data, "de_layerwise", s, seed,
                                                                                 finalist_bn=args.finalist_bn))["nfev"]
                c = cells.run((seed, m, s), lambda: run_cell(dense, data, m, s, seed, budget,
                                                             finalist_bn=args.finalist_bn))
                print(f"seed {seed} {s:.2f} {m:18s} test {c['test']:.4f} ({c['wall_seconds']:.0f} s) "
                      f"chosen {c['chosen']}", flush=True)
    text, pairs = summary(cells, args.seeds, args.sparsities)
    dense = [cells.get((sd, "dense", 0.0))["test"] for sd in args.seeds if (sd, "dense", 0.0) in cells]
    text = f"Dense test accuracy: {100 * sum(dense) / max(1, len(dense)):.2f}% (mean of {len(dense)} seeds)\n\n" + text
    print(text)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(pairs, indent=1))
    plot(cells, args.seeds, args.sparsities, out / "accuracy.png", cls.__name__)


if __name__ == "__main__":
    main()
