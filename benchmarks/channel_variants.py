"""de_channel search variants on ResNet-20 (or ``--model mobilenetv2``) at 1/2 of the MACs: which fitness or bounds would make the
searched allocation retrain better than a uniform one?

Same setup as ``channel.py`` (its ``Setup``: data, dense model, 500 search images, 2 retraining epochs),
one ``de_channel`` run per variant and seed; the test accuracy of the sliced, retrained model is written
to ``--out`` (merged with earlier runs), to be paired with ``channel.py``'s ``l1_uniform`` rows.

Variants (combinable, e.g. ``narrow+loss``):
* ``narrow``: ``max_group_ratio=0.5`` (every group keeps at least half its channels; default 0.8);
* ``loss``: the search maximises minus the cross-entropy on the search images, not their accuracy;
* ``val2k``: the search scores on all 2,000 validation images, not 500;
* ``fin``: ``finalists=3`` (re-ranking after one epoch of retraining).

    python benchmarks/channel_variants.py --seeds 0 1 2 --variants narrow --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import channel as bench  # noqa: E402

import de_plugin  # noqa: E402
from de_plugin.adapter import slice_channels  # noqa: E402
from de_plugin.demo.data import load_idx_dataset  # noqa: E402
from de_plugin.evaluation import evaluator_from_batches  # noqa: E402


def variant_options(variant: str, setup: bench.Setup, data) -> dict:
    parts = set(variant.split("+"))
    unknown = parts - {"narrow", "loss", "val2k", "fin"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)}: use narrow, loss, val2k, fin joined by '+'")
    opts: dict = {"evaluate": setup.search}
    if "narrow" in parts:
        opts["max_group_ratio"] = 0.5
    if "loss" in parts:
        n = setup.args.search_val  # the core's metric="neg_loss" path, on the same search images
        opts["evaluate"] = evaluator_from_batches([(data.x_val[:n], data.y_val[:n])], "neg_loss")
    if "val2k" in parts:
        opts["evaluate"] = bench.make_evaluate(data.x_val, data.y_val)
    if "fin" in parts:
        opts.update(finalists=3, finalist_epochs=1)
    return opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--variants", nargs="+", default=["narrow"])
    ap.add_argument("--model", default="resnet20", choices=list(bench.CONFIG))
    ap.add_argument("--level", type=float, default=0.5, help="MACs kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/channel_variants/results.json")
    cli = ap.parse_args()
    torch.set_num_threads(cli.threads)
    args = argparse.Namespace(epochs=2, train_limit=8000, search_val=500, generations=10, threads=cli.threads,
                              data=bench.FASHION_MNIST_DIR)
    data = load_idx_dataset(args.data, val_size=2000, train_limit=args.train_limit, seed=0, size=32)
    data.x_test, data.y_test = data.x_test[:5000], data.y_test[:5000]
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.exists() else {}
    for seed in cli.seeds:
        setup = bench.Setup(cli.model, seed, data, args)
        for variant in cli.variants:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            r = de_plugin.prune(setup.dense, "de_channel", macs=cli.level, rounds=1, finetune_epochs=args.epochs,
                                generations=args.generations, train_data=setup.calib, finetune=setup.finetune(),
                                seed=seed, progress=False, **variant_options(variant, setup, data))
            small = r.model.eval()
            slice_channels(small, setup.example, r.extra_masks)
            row = {"test": setup.test(small), "kept": [round(g["kept"] / g["channels"], 2) for g in r.extra["groups"]],
                   "s": time.perf_counter() - t0, "score": r.history[-1].get("val_accuracy_before_finetune")}
            res.setdefault(variant if cli.model == "resnet20" else f"{cli.model}:{variant}", {})[str(seed)] = row
            print(seed, variant, row, flush=True)
            out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
