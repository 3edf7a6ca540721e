"""Memory and per-round cost of ``de_layerwise`` on larger models (issue 19).

For each model: peak RSS of a one-round search beyond the model and its data (bytes per pruned
weight, from ``ru_maxrss`` in a fresh process per model), the per-round setup (backend round start:
the one magnitude sort; the seed allocations), the per-candidate mask application against one
forward pass over the validation batch, and the share of prunable weights the targets cover
(attention projections included). Random weights and data: the costs do not depend on them.

    python benchmarks/big_models.py --out benchmarks/results/big_models
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODELS = ("vgg_cifar", "resnet_wide", "vit_small")


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "vgg_cifar":
        layers, c = [], 3
        for w in (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"):
            if w == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 4, 512), nn.ReLU(), nn.Linear(512, 10)), \
            torch.randn(64, 3, 32, 32)
    if name == "resnet_wide":
        from de_plugin.demo.models import SmallResNet

        return SmallResNet(in_channels=3, widths=(64, 128, 256)), torch.randn(64, 3, 32, 32)

    class ViT(nn.Module):
        def __init__(self, dim=256, depth=6):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 4, stride=4)
            self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 8, 4 * dim, dropout=0.0, batch_first=True)
                                          for _ in range(depth)])
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            return self.head(self.blocks(self.patch(x).flatten(2).transpose(1, 2)).mean(1))

    return ViT(), torch.randn(64, 3, 32, 32)


def measure(name: str) -> dict:
    """Run in a fresh process (``--one``): peak RSS is per process."""
    import de_plugin
    from de_plugin.evaluation import MagnitudeScorer
    from de_plugin.targets import find_targets

    torch.set_num_threads(2)
    model, x = build(name)
    model.eval()
    y = torch.randint(0, 10, (len(x),))
    targets = find_targets(model)
    n = sum(t.numel for t in targets)
    prunable = sum(p.numel() for m in model.modules() for pn, p in m.named_parameters(recurse=False)
                   if pn.endswith("weight") and p.dim() > 1)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(3):
            model(x)
        forward = (time.perf_counter() - t0) / 3
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    r = de_plugin.prune(model, "de_layerwise", val_data=[(x, y)], sparsity=0.9, rounds=1, population=8, generations=2,
                        sensitivity_scan=False, finetune_epochs=0, inplace=True, progress=False)
    run_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    h = r.history[0]
    scorer = MagnitudeScorer(model, targets, lambda m: 0.0)
    t0 = time.perf_counter()
    scorer.reset()
    sort_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    cands = [np.array([int(t.numel * rng.uniform(0.02, 0.5)) for t in targets]) for _ in range(20)]
    times = []
    for c in cands:
        t0 = time.perf_counter()
        scorer.apply(c)
        times.append(time.perf_counter() - t0)
    scorer.restore()
    apply_s = statistics.median(times)
    return {"model": name, "pruned_weights": n, "prunable_weights": prunable, "coverage": n / prunable,
            "peak_extra_bytes_per_weight": (peak - base) / n, "run_s": run_s, "search_s": h["search_seconds"],
            "round_sort_s": sort_s, "apply_ms": apply_s * 1e3, "forward_ms": forward * 1e3,
            "apply_over_forward": apply_s / forward, "nfev": r.nfev}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--out", default="benchmarks/results/big_models")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    rows = []
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = f"{'model':12} {'weights':>10} {'coverage':>8} {'peak B/w':>8} {'sort s':>7} {'apply ms':>8} " \
           f"{'fwd ms':>7} {'apply/fwd':>9} {'search s':>8} {'run s':>6}"
    print(head)
    for r in rows:
        print(f"{r['model']:12} {r['pruned_weights']:>10,} {r['coverage']:>8.2f} {r['peak_extra_bytes_per_weight']:>8.1f} "
              f"{r['round_sort_s']:>7.2f} {r['apply_ms']:>8.2f} {r['forward_ms']:>7.1f} {r['apply_over_forward']:>9.3f} "
              f"{r['search_s']:>8.1f} {r['run_s']:>6.1f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
