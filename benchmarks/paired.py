"""Paired differences with 95% intervals from the benchmarks' results files: the numbers behind every
"ahead / behind" in BENCHMARKS.md.

A comparison is method A minus method B in test accuracy (pp), seed by seed on the same dense model,
data and fine-tuning budget; the mean of those differences is reported with its two-sided 95%
Student-t interval (n - 1 degrees of freedom). With one seed there is no interval: the row is an
illustration. ``python benchmarks/paired.py`` prints the summary table of BENCHMARKS.md and writes it
to ``benchmarks/results/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

from scipy import stats

RESULTS = Path(__file__).resolve().parent / "results"


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """Mean of a[s] - b[s] over the seeds both have (in pp), its 95% t-interval and the per-seed values."""
    seeds = sorted(set(a) & set(b), key=str)
    diffs = [100.0 * (a[s] - b[s]) for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None, "diffs": diffs, "seeds": seeds}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "diffs": diffs, "seeds": seeds}


def ladder_tests(files: list[str], model: str, method: str, rung: float) -> dict[str, float]:
    """Test accuracy per seed at a ladder rung (layerwise.py / deep.py results), over several files."""
    out: dict[str, float] = {}
    for f in files:
        runs = json.loads((RESULTS / f / "results.json").read_text())["models"][model]["runs"]
        for seed, rungs in runs.get(method, {}).items():
            for r in rungs:
                if abs(r["sparsity"] - rung) < 1e-6:
                    out[seed] = r["test"]
    return out


def _within_files(files: list[str], model: str, a: str, b: str, rung: float) -> tuple[dict, dict]:
    """Test accuracies of a and b per seed, paired only within a file (one run: one dense model a seed)."""
    ta: dict[str, float] = {}
    tb: dict[str, float] = {}
    for f in files:
        try:
            fa, fb = ladder_tests([f], model, a, rung), ladder_tests([f], model, b, rung)
        except (FileNotFoundError, KeyError):
            continue
        for seed in set(fa) & set(fb):
            ta[seed], tb[seed] = fa[seed], fb[seed]
    return ta, tb


def level_tests(file: str, model: str, method: str, level: float) -> dict[str, float]:
    """Test accuracy per seed at a MACs level (channel.py results)."""
    levels = json.loads((RESULTS / file / "results.json").read_text())["models"][model]["levels"]
    key = next(k for k in levels if abs(float(k) - level) < 1e-4)
    return {s: v["test"] for s, v in levels[key].get(method, {}).items()}


#: (claim, model, A, B, rung or level, how to read it): the comparisons the summary reports
SAME_RECOVERY = ["lamp[splicing]", "erk[splicing]", "global_magnitude[splicing]"]
LADDERS = [  # A against the best of B (the baseline with the highest mean test accuracy at that rung)
    ("LeNet-300-100", ["lenet300_frameworks_final"], "lenet300", "de_layerwise", ["lamp + splicing"]),
    ("LeNet-5", ["lenet5"], "lenet5", "de_layerwise", ["lamp[recovery=splicing]"]),
    ("ResNet-20", ["deep", "deep_seed1"], "resnet20", "de_layerwise[defaults]", SAME_RECOVERY),
    ("ViT", ["deep_vit"], "vit", "de_layerwise[defaults]", SAME_RECOVERY),
    ("MobileNetV2", ["deep_mbv2"], "mobilenetv2", "de_layerwise[defaults]", SAME_RECOVERY),
]
#: rows measured with the retrained finalists scored on the BatchNorm statistics their retraining left
#: (``finalist_adaptive_bn=False``: selection.py's ``[...,trained-bn]`` methods, ``--finalist-bn as-trained``)
TRAINED_BN = ", finalists on trained BN"
CHANNELS = [  # (label, folder, model, A, B, what the "at" column adds)
    ("ResNet-20", "channel", "resnet20", "de_channel", "l1_uniform", ""),
    ("ResNet-20", "channel", "resnet20", "de_channel", "tp_global", ""),
    ("ResNet-20", "channel_variants", "resnet20", "de_channel[loss]", "l1_uniform", ""),
    ("MobileNetV2", "channel_mbv2", "mobilenetv2", "de_channel", "l1_uniform", ""),
    ("MobileNetV2", "channel_mbv2", "mobilenetv2", "de_channel", "tp_global", ""),
    ("ResNet-20", "channel_converged", "resnet20", "de_channel", "l1_uniform", ", converged reference"),
    ("ResNet-20", "channel_converged", "resnet20", "de_channel", "tp_global", ", converged reference"),
    ("ResNet-20", "channel_converged", "resnet20", "de_channel[finalists]", "l1_uniform", ", converged reference" + TRAINED_BN),
    ("ResNet-20", "channel_converged", "resnet20", "de_channel[finalists]", "tp_global", ", converged reference" + TRAINED_BN),
    ("ResNet-20", "channel_converged_cpu", "resnet20", "de_channel", "l1_uniform", ", CPU reference"),
    ("ResNet-20", "channel_converged_cpu", "resnet20", "de_channel", "tp_global", ", CPU reference"),
    ("ResNet-20", "channel_converged_cpu", "resnet20", "de_channel[finalists]", "l1_uniform", ", CPU reference" + TRAINED_BN),
    ("ResNet-20", "channel_converged_cpu", "resnet20", "de_channel[finalists]", "tp_global", ", CPU reference" + TRAINED_BN),
    ("ResNet-20", "channel_converged_cpu_bn", "resnet20", "de_channel[finalists]", "l1_uniform", ", CPU reference"),
    ("ResNet-20", "channel_converged_cpu_bn", "resnet20", "de_channel[finalists]", "tp_global", ", CPU reference"),
]


def fmt(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "no paired seeds"
    if p["low"] is None:
        return f"{p['mean']:+.2f} (one seed: illustration)"
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"


def strongest(pairs: dict[str, dict[str, Any]]) -> Optional[tuple[str, dict[str, Any]]]:
    """The baseline a row is reported against: among those paired over the most seeds, the one A leads
    least. A baseline measured on fewer seeds never stands in for one measured on all of them."""
    got = [(b, p) for b, p in pairs.items() if p["n"]]
    return min(got, key=lambda bp: (-bp[1]["n"], bp[1]["mean"])) if got else None


def rows(rungs: list[float], levels: list[float]) -> list[dict[str, Any]]:
    out = []
    for name, files, model, a, baselines in LADDERS:
        for r in rungs:
            best = strongest({b: paired(*_within_files(files, model, a, b, r)) for b in baselines})
            if best is not None:
                out.append({"model": name, "a": a, "b": best[0], "at": f"{r:.0%} sparse", **best[1]})
    for name, file, model, a, b, note in CHANNELS:
        for lv in levels:
            try:
                p = paired(level_tests(file, model, a, lv), level_tests(file, model, b, lv))
            except (FileNotFoundError, KeyError, StopIteration):
                continue
            out.append({"model": name, "a": a, "b": b, "at": f"{lv:.2f} of the MACs{note}", **p})
    cells = [(*row, rungs) for row in SELECTIONS] + [(name, folder, None, *rest) for name, folder, *rest in UNSEEN]
    for name, folder, model, a, baselines, note, own in cells:
        for r in own:
            best = strongest({b: paired(selection_tests(folder, model, a, r), selection_tests(folder, model, b, r))
                              for b in baselines})
            if best is not None:
                out.append({"model": name, "a": a, "b": best[0], "at": f"{r:.0%} sparse{note}", **best[1]})
    return [r for r in out if r["n"]]


#: unseen.py: a user's model and data no default was chosen on (label, folder, A, baselines, note, its rungs):
#: the default and its look-ahead variant on each model
UNSEEN = [(label, folder, a, ["lamp", "global_magnitude", "erk"], f", sklearn digits, 3 rounds, splicing for all{bn}", rungs)
          for label, folder, rungs, bn in (("DigitsResNet", "unseen_bn", (0.8, 0.9, 0.95, 0.98), ", second dense set"),
                                           ("DigitsResNet", "unseen", (0.8, 0.9, 0.95, 0.98), TRAINED_BN),
                                           ("DigitsViT", "unseen_vit", (0.8, 0.9, 0.95), ""),
                                           ("DigitsMobileNet", "unseen_mobilenet_bn", (0.7, 0.8, 0.9), ", second dense set"),
                                           ("DigitsMobileNet", "unseen_mobilenet", (0.7, 0.8, 0.9), TRAINED_BN))
          for a in ("de_layerwise", "de_layerwise[look-ahead]")]
#: the same script on a second machine, whose float kernels train other dense weights from the same seeds: the
#: default against LAMP (a replication) and against random allocations held to the evaluations it spent
EQUAL = "de_layerwise[random, equal evaluations]"
UNSEEN += [(label, folder, "de_layerwise", [b], f", sklearn digits, second dense set{note}{bn}", rungs)
           for label, folder, rungs, bn in (("DigitsResNet", "unseen_equal", (0.8, 0.9, 0.95, 0.98), TRAINED_BN),
                                            ("DigitsViT", "unseen_vit_equal", (0.8, 0.9, 0.95), ""),
                                            ("DigitsMobileNet", "unseen_mobilenet_equal", (0.7, 0.8, 0.9), TRAINED_BN))
           for b, note in (("lamp", ""), (EQUAL, ", random at equal evaluations"))]


#: selection.py studies (one round from a converged reference): (label, folder, model, A, baselines, which
#: reference: the H200 set, or the CPU-trained set that ships; BENCHMARKS.md, "Converged dense references")
HEURISTICS = ["lamp", "global_magnitude", "erk"]
H200, CPU = ", converged reference", ", CPU reference"
CPU300 = ", CPU reference, 10 x 30 steps"
SELECTIONS = [
    ("LeNet-300-100", "selection", "lenet300", "de_layerwise[finetune]", HEURISTICS, H200),
    ("LeNet-300-100", "selection", "lenet300", "de_layerwise[holdout]", HEURISTICS, H200),
    ("LeNet-300-100", "selection", "lenet300", "de_layerwise[random]", HEURISTICS, H200),
    ("LeNet-300-100", "selection", "lenet300", "de_layerwise[evopress]", HEURISTICS, H200),
    ("ResNet-20", "selection_resnet20", "resnet20", "de_layerwise[finetune,trained-bn]", HEURISTICS, H200),
    ("ResNet-20", "selection_resnet20", "resnet20", "de_layerwise[holdout]", HEURISTICS, H200),
    ("ResNet-20", "selection_resnet20", "resnet20", "de_layerwise[random,trained-bn]", HEURISTICS, H200),
    ("ResNet-20", "selection_resnet20", "resnet20", "de_layerwise[evopress,trained-bn]", HEURISTICS, H200),
    ("ResNet-20", "selection_resnet20", "resnet20", "de_layerwise[finetune+margin,trained-bn]", HEURISTICS, H200),
    ("ResNet-20", "selection_resnet20", "resnet20", "de_layerwise[full-finalists,trained-bn]", HEURISTICS, H200),
    ("MobileNetV2", "selection_mbv2", "mobilenetv2", "de_layerwise[finetune,trained-bn]", HEURISTICS, H200),
    ("ViT", "selection_vit", "vit", "de_layerwise[finetune]", HEURISTICS, H200),
    ("LeNet-300-100", "selection_lenet300_cpu", "lenet300", "de_layerwise[finetune]", HEURISTICS, CPU),
    ("LeNet-300-100", "selection_lenet300_cpu", "lenet300", "de_layerwise[random]", HEURISTICS, CPU),
    ("ResNet-20", "selection_resnet20_cpu", "resnet20", "de_layerwise[finetune,trained-bn]", HEURISTICS, CPU),
    ("ResNet-20", "selection_resnet20_cpu", "resnet20", "de_layerwise[random,trained-bn]", HEURISTICS, CPU),
    ("ResNet-20", "selection_resnet20_cpu", "resnet20", "de_layerwise[finetune+seeds,trained-bn]", HEURISTICS, CPU),
    ("ResNet-20", "selection_resnet20_cpu_300", "resnet20", "de_layerwise[finetune,trained-bn]", HEURISTICS, CPU300),
    ("ResNet-20", "selection_resnet20_cpu_300", "resnet20", "de_layerwise[finetune+seeds,trained-bn]", HEURISTICS, CPU300),
    ("ResNet-20", "selection_resnet20_cpu_300", "resnet20", "de_layerwise[finetune]", HEURISTICS, CPU300),
    ("MobileNetV2", "selection_mbv2_cpu", "mobilenetv2", "de_layerwise[finetune,trained-bn]", HEURISTICS, CPU),
    ("MobileNetV2", "selection_mbv2_cpu", "mobilenetv2", "de_layerwise[finetune]", HEURISTICS, CPU),
]


def selection_tests(folder: str, model: Optional[str], method: str, rung: float) -> dict[str, float]:
    """Test accuracy per seed from a cells file (empty when absent): selection.py's keys model|seed|method|rung,
    or with ``model=None`` unseen.py's seed|method|rung (one model per study)."""
    path = RESULTS / folder / "cells.json"
    if not path.exists():
        return {}
    out = {}
    for key, cell in json.loads(path.read_text())["cells"].items():
        parts = key.split("|")
        m, (seed, meth, s) = (None, parts) if model is None else (parts[0], parts[1:])
        if m == model and meth == method and abs(float(s) - rung) < 1e-9:
            out[seed] = cell["test"]
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rungs", type=float, nargs="*", default=[0.8, 0.9, 0.95])
    ap.add_argument("--levels", type=float, nargs="*", default=[0.5, 1 / 3])
    ap.add_argument("--out", default=str(RESULTS / "summary.json"))
    args = ap.parse_args(argv)
    table = rows(args.rungs, args.levels)
    print("| model | A | B | at | seeds | A - B, test pp: mean [95% CI] |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | `{r['a']}` | `{r['b']}` | {r['at']} | {r['n']} | {fmt(r)} |")
    Path(args.out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
