"""Memory and per-round cost of ``de_layerwise`` on larger models.

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
import os
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


#: torchvision's largest classifiers (``tv:<name>``, random weights, from .zoo-site): 112 px and 4 images
#: keep a forward to seconds on 2 cores; the weights are the full model's (ViT: all but the position table)
HUGE = {"vit_h_14": {"image_size": 112}, "regnet_y_128gf": {}}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("tv:"):
        from tvzoo import import_torchvision

        arch = name[3:]
        model = import_torchvision().get_model(arch, weights=None, num_classes=10, **HUGE.get(arch, {}))
        return model.eval(), torch.randn(4, 3, 112, 112)
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


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> int:
    """Reset the process's peak RSS (Linux: ``clear_refs`` 5) and return the RSS now: the search's
    peak is then measured from here, not from an earlier high-water mark (building the model)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:  # no procfs: the lifetime peak (an underestimate when the build peaked higher)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return _status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name: str, low_memory: bool = False) -> dict:
    """Run in a fresh process (``--one``): peak RSS is per process."""
    import de_plugin
    from de_plugin.weights.magnitude import MagnitudeScorer
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
    reset_peak()  # the baseline: the model, its data and one evaluation forward's activations at their peak
    with torch.no_grad():
        model(x)
    base = peak_rss()
    reset_peak()
    t0 = time.perf_counter()
    r = de_plugin.prune(model, "de_layerwise", val_data=[(x, y)], sparsity=0.9, rounds=1,
                        # the huge models: the smallest population the 130-dim search allows, one generation
                        population=8 if len(targets) <= 80 else -(-len(targets) // 10), generations=2 if n < 5e7 else 1,
                        sensitivity_scan=False, finetune_epochs=0, inplace=True, progress=False,
                        low_memory=low_memory)
    run_s = time.perf_counter() - t0
    peak = peak_rss()
    h = r.history[0]
    scorer = MagnitudeScorer(model, targets, lambda m: 0.0, low_memory=low_memory)
    t0 = time.perf_counter()
    scorer.reset()
    sort_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    cands = [np.array([int(t.numel * rng.uniform(0.02, 0.5)) for t in targets]) for _ in range(20 if n < 5e7 else 3)]
    times = []
    for c in cands:
        t0 = time.perf_counter()
        scorer.apply(c)
        times.append(time.perf_counter() - t0)
    scorer.restore()
    apply_s = statistics.median(times)
    return {"model": name, "low_memory": low_memory, "pruned_weights": n, "prunable_weights": prunable, "coverage": n / prunable,
            "peak_extra_bytes_per_weight": (peak - base) / n, "peak_rss_gib": peak / 2**30, "run_s": run_s, "search_s": h["search_seconds"],
            "round_sort_s": sort_s, "apply_ms": apply_s * 1e3, "forward_ms": forward * 1e3,
            "apply_over_forward": apply_s / forward, "nfev": r.nfev}


#: glibc's default mmap threshold moves up as large blocks are freed, after which freed memory stays in
#: the process: the peak then depends on the order of frees (runs of one config scatter by +-50%). A
#: fixed threshold returns every block over 64 KiB when freed, so the peak follows what is allocated.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_one(name: str, low_memory: bool, repeats: int, glibc_default: bool = False) -> dict:
    """The median-peak row of ``repeats`` fresh processes."""
    rows = []
    env = dict(os.environ, **({} if glibc_default else MEASURE_ENV))
    for _ in range(repeats):
        cmd = [sys.executable, __file__, "--one", name] + (["--low-memory"] if low_memory else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows.sort(key=lambda r: r["peak_extra_bytes_per_weight"])
    row = dict(rows[len(rows) // 2])
    row["peak_extra_bytes_per_weight_runs"] = [r["peak_extra_bytes_per_weight"] for r in rows]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS),
                    help=f"{', '.join(MODELS)}, or tv:<torchvision name> (e.g. tv:vit_h_14)")
    ap.add_argument("--out", default="benchmarks/results/big_models")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", action="store_true", help="only de_layerwise's low_memory=True (default: both modes)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per row; the median peak is reported")
    ap.add_argument("--glibc-default", action="store_true", help="measure under glibc's default mmap threshold")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.low_memory)))
        return 0
    bad = [m for m in args.models if m not in MODELS and not m.startswith("tv:")]
    if bad:
        ap.error(f"unknown model(s) {bad}: choose from {', '.join(MODELS)} or tv:<torchvision name>")
    rows = [run_one(name, lm, args.repeats, args.glibc_default) for name in args.models for lm in ([True] if args.low_memory else [False, True])]
    head = f"{'model':16} {'mode':10} {'weights':>11} {'coverage':>8} {'peak B/w':>8} {'peak GiB':>8} {'sort s':>7} " \
           f"{'apply ms':>8} {'fwd ms':>8} {'apply/fwd':>9} {'search s':>8} {'run s':>6}"
    print(head)
    for r in rows:
        print(f"{r['model']:16} {'low_memory' if r['low_memory'] else 'ranks':10} {r['pruned_weights']:>11,} "
              f"{r['coverage']:>8.2f} {r['peak_extra_bytes_per_weight']:>8.1f} {r['peak_rss_gib']:>8.2f} "
              f"{r['round_sort_s']:>7.2f} {r['apply_ms']:>8.2f} {r['forward_ms']:>8.1f} {r['apply_over_forward']:>9.3f} "
              f"{r['search_s']:>8.1f} {r['run_s']:>6.1f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "results.json"
    old = json.loads(path.read_text()) if path.exists() else []
    keep = [r for r in old if (r["model"], r.get("low_memory", False)) not in {(x["model"], x["low_memory"]) for x in rows}]
    path.write_text(json.dumps(keep + rows, indent=2))  # rows of models not rerun are kept
    return 0


if __name__ == "__main__":
    sys.exit(main())
