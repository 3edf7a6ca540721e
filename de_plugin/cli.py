"""Command line: ``de-plugin run`` (the main job), ``de-plugin list``; adapters add commands.

``de-plugin run`` trains (or loads from the cache) a dense model on an MNIST-format dataset,
prunes it with the chosen pruner and writes a report: per-layer table, compression, accuracy
before/after (validation and test), search cost and storage, as text, JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import prune
from .demo.data import FASHION_MNIST_DIR, load_cifar10, load_idx_dataset
from .demo.models import DEEP_MODELS, MODELS
from .demo.training import dense_model, make_evaluate, make_finetune
from .plugins import load_plugins
from .pruner import check_goal
from .registry import create_pruner, get_pruner_class, list_pruners
from .report import check_out_dir, format_table, write_report

#: the main job's options; ``--options`` adds to them (keys the chosen pruner has), it does not replace them
RUN_DEFAULTS = {"rounds": 4, "finetune_epochs": 2}


def load_data(args: argparse.Namespace):
    """The folder's dataset: CIFAR-10 python batches when it holds ``data_batch_1``, else IDX files
    (padded to 32x32 for the deep models)."""
    if (Path(args.data) / "data_batch_1").exists():
        return load_cifar10(args.data, val_size=args.val_size, train_limit=args.train_limit, seed=args.seed)
    return load_idx_dataset(args.data, val_size=args.val_size, train_limit=args.train_limit, seed=args.seed,
                            size=32 if args.model in DEEP_MODELS else None)


def run_options(pruner: str, given: dict, accuracy_form: bool = False) -> dict:
    """The main job's defaults under the user's options; the accuracy form keeps going until the drop is
    used (no fixed round count) unless `rounds` is given."""
    fields = get_pruner_class(pruner).Options.model_fields
    defaults = {k: v for k, v in RUN_DEFAULTS.items() if k in fields and not (accuracy_form and k == "rounds")}
    return {**defaults, **given}


#: the main job's finalists are retrained for this share of a round's fine-tune (see ``finalist_cap``)
FINALIST_SHARE = 0.1


def finalist_cap(pruner: str, options: dict, epoch_steps: int) -> dict:
    """``options`` with ``finalist_steps`` at FINALIST_SHARE of a round's fine-tune steps (``finetune_epochs``
    x ``epoch_steps``), where the pruner retrains finalists and the user set neither ``finalist_steps`` nor
    ``finalist_epochs``.

    The library retrains each finalist for whole epochs of the user's ``finetune`` (it cannot know an
    epoch's length); the main job knows its data. Over sampled allocations, the accuracy after the first
    tenth of the fine-tune ranked them best (BENCHMARKS.md, "Which fitness predicts the outcome"), and
    on the main job a tenth left test accuracy where whole epochs put it, with half the training steps."""
    cls = get_pruner_class(pruner).Options
    if "finalist_steps" not in cls.model_fields or {"finalist_steps", "finalist_epochs"} & options.keys():
        return options
    o = cls(**options)
    if not getattr(o, "finalists", 0) or getattr(o, "selection", None) in ("holdout", "search"):
        return options
    return {**options, "finalist_steps": max(1, round(FINALIST_SHARE * o.finetune_epochs * epoch_steps))}


def cmd_run(args: argparse.Namespace) -> int:
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--options is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                         f"give an object, e.g. '{{\"rounds\": 4}}'") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object of pruner options, e.g. '{{\"rounds\": 4}}', got {args.options!r}")
    goal = {"sparsity": args.sparsity} if args.max_accuracy_drop is None else {"max_accuracy_drop": args.max_accuracy_drop}
    options = run_options(args.pruner, options, accuracy_form=args.max_accuracy_drop is not None)
    create_pruner(args.pruner, **options)  # bad names, options and goals fail here, before any training
    check_goal(args.pruner, **goal)
    check_out_dir(args.out, args.overwrite)
    data = load_data(args)
    t_dense = time.perf_counter()
    kwargs = {"in_channels": int(data.x_train.shape[1])} if args.model in DEEP_MODELS else {}
    model = dense_model(args.model, data, args.train_epochs, args.seed, args.data, **kwargs)
    t_dense = time.perf_counter() - t_dense
    test = make_evaluate(data.x_test, data.y_test)
    finetune = make_finetune(data.x_train, data.y_train, lr=args.lr)
    options = finalist_cap(args.pruner, options, -(-len(data.y_train) // 128))  # make_finetune's batches of 128
    dense_test = test(model)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    # a few training batches: BatchNorm models score candidates with re-estimated statistics (adaptive BN)
    train_data = [data.x_train[i:i + 128] for i in range(0, min(len(data.y_train), 8 * 128), 128)]
    # validation as batches, not an opaque evaluate(): the search can then stop scoring a candidate
    # part-way once it cannot beat its parent (early_reject; exact, the same masks)
    val_data = [(data.x_val[i:i + 500], data.y_val[i:i + 500]) for i in range(0, len(data.y_val), 500)]
    result = prune(model, args.pruner, val_data=val_data, finetune=finetune, seed=args.seed,
                   exclude=args.exclude or None, train_data=train_data, **goal, **options)
    test_acc = test(result.model)
    extra = {
        "test accuracy": f"dense {dense_test:.4f} -> pruned {test_acc:.4f} (drop {100 * (dense_test - test_acc):+.2f} pp; "
                         f"the pruned model had {finetune.steps} fine-tune steps the dense one did not)",
        "fine-tune gradient steps": finetune.steps,
        "wall time of pruning (s)": round(time.perf_counter() - t0, 1),
        "dense model, trained or loaded from the cache (s)": round(t_dense, 1),
    }
    print(format_table(result, extra))
    paths = write_report(result, args.out, {"dense_test_accuracy": dense_test, "test_accuracy": test_acc,
                                             "finetune_steps": finetune.steps, "model": args.model}, extra)
    result.save(Path(args.out) / "pruned.pt")
    try:
        onnx = result.export_onnx(Path(args.out) / "pruned.onnx", data.x_val[:2])
        print(f"ONNX: {onnx['path']} ({onnx['bytes'] / 1024:.1f} KiB; pruned weights are stored as zeros)")
    except ImportError:
        pass  # onnx is an optional extra
    print(f"\nwrote {paths['json']}, {paths['text']}, {paths['plot']} and {Path(args.out) / 'pruned.pt'} "
          f"(the pruned model: de_plugin.load(path, model))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="de-plugin", description="de-plugin: differential-evolution layer-wise pruning "
                                "and coarse random-mask pruning (main job, pruner list, framework commands)")
    p.add_argument("--verbose", action="store_true", help="debug logging, frameworks' chatter included")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, prune and report (default: de_layerwise on LeNet-300-100 / Fashion-MNIST)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--pruner", default="de_layerwise", help=f"one of: {', '.join(list_pruners())}")
    r.add_argument("--model", default="lenet300", choices=sorted(MODELS))
    r.add_argument("--data", default=FASHION_MNIST_DIR,
                   help="folder with MNIST-format IDX files, or an extracted CIFAR-10 `cifar-10-batches-py` folder")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--sparsity", type=float, default=0.95)
    g.add_argument("--max-accuracy-drop", type=float, default=None)
    r.add_argument("--options", default=None,
                   help=f"pruner options as a JSON object, added to the main job's {json.dumps(RUN_DEFAULTS)}")
    r.add_argument("--exclude", nargs="*", default=[], help="module names not to prune")
    r.add_argument("--train-epochs", type=int, default=10)
    r.add_argument("--val-size", type=int, default=5000)
    r.add_argument("--train-limit", type=int, default=None, help="use only this many training images (quick runs)")
    r.add_argument("--lr", type=float, default=5e-4, help="fine-tune learning rate (Adam)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="runs/main", help="where to write the results (refused if it holds one)")
    r.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    r.set_defaults(func=cmd_run)
    ls = sub.add_parser("list", help="list the available pruners")
    ls.set_defaults(func=lambda a: print("\n".join(list_pruners())) or 0)
    load_plugins().hook.register_commands(subparsers=sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.getLogger("de_plugin").setLevel(logging.DEBUG)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"de-plugin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("de-plugin: interrupted (with checkpoint=..., run again with resume=true to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
