"""random_coarse on the torchvision classification zoo: coupling, speedup, output equality, cost.

For every torchvision classification model (random weights, 10 classes, small inputs) as a user would
run it: ``de_plugin.prune(model, "random_coarse", feature_map_ratio=r, linear_ratio=r)`` (one candidate,
no retraining: this measures the structure, not accuracy), then our speedup
(:func:`de_plugin.channels.slicing.speedup`) and, with ``--nni``, NNI's ``ModelSpeedup`` on the same masks; each
sped-up model is compared with the masked one in eval mode (max |diff| relative to max |output|).
``--tp`` also runs Torch-Pruning's DepGraph pruner (MetaPruner, L1 magnitude, the same ratio, the
classifier ignored) on the same model: whether it produces a smaller model that runs. Results: a
table (stdout and ``table.md``) and ``results.json`` under ``--out``.

    python benchmarks/zoo.py --nni --tp --out benchmarks/results/zoo
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tvzoo  # noqa: E402  (torchvision from .zoo-site, with the import shim)

models = tvzoo.import_torchvision()

import de_plugin  # noqa: E402
from de_plugin.channels.coarse import count_macs  # noqa: E402
from de_plugin.channels.coupling import CouplingError, channel_groups  # noqa: E402
from de_plugin.channels.slicing import speedup  # noqa: E402

log = logging.getLogger("zoo")
#: inputs the architectures need: ViTs a fixed 224, MaxViT its partition sizes, Inception V3 at least 75
SIZE = {"vit": 224, "maxvit": 224, "inception_v3": 128}
#: instantiate and trace in seconds to minutes on 2 cores; --huge adds them
HUGE = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32"}


def input_size(name: str) -> int:
    return next((s for k, s in SIZE.items() if name.startswith(k)), 64)


def build(name: str) -> torch.nn.Module:
    return tvzoo.build(models, name)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (a.abs().max() + 1e-12))


def run_ours(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> tuple[dict, torch.nn.Module, dict]:
    groups = channel_groups(model, x)
    row = {"layers": sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules()),
           "groups": len(groups), "locked": sum(bool(g.locked) for g in groups),
           "unresolved": sum(bool(g.unresolved and not g.locked) for g in groups)}
    unres = sorted({u.split(" (node")[0] for g in groups if not g.locked for u in g.unresolved})
    row["unresolved_ops"] = unres[:3]
    score = lambda m: float(m(x).float().std())  # noqa: E731 - structure only: any deterministic score
    opts = dict(evaluate=score, feature_map_ratio=ratio, linear_ratio=ratio, candidates=1, adaptive_bn=False,
                progress=False)
    with torch.no_grad():
        try:
            res = de_plugin.prune(model, "random_coarse", **opts)
        except CouplingError as exc:  # as a user would: read the error, leave those groups unpruned
            row["refused_first"] = str(exc)[:200]
            res = de_plugin.prune(model, "random_coarse", unresolved="skip", **opts)
    masked = res.model.eval()
    row["pruned_groups"] = len(res.extra["groups"])
    row["channels"] = sum(g["channels"] for g in res.extra["groups"])
    row["channels_removed"] = sum(g["channels"] - g["kept"] for g in res.extra["groups"])
    macs = count_macs(model, x)
    row.update(params_before=macs["params_dense"], macs_before=macs["macs_dense"])
    return row, masked, res.extra_masks


CHILD_TIMEOUT = [None]  # seconds a child may run (--child-timeout); None: no limit


def in_child(fn, *args, memory_gb: float = 8.0) -> dict:
    """``fn(*args)`` in a forked process under a memory limit: NNI's ModelSpeedup on MaxViT at 224x224 grew
    past 22 GB and was OOM-killed with the benchmark; a child that runs out reports it as a row, and so does
    one that runs past ``--child-timeout`` (NNI's shape inference on Swin ran for over 25 minutes)."""
    import multiprocessing as mp
    import resource

    def target(conn):
        resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * 2**30), int(memory_gb * 2**30)))
        try:
            conn.send(fn(*args))
        except MemoryError:
            conn.send({"ok": False, "error": f"MemoryError: over {memory_gb:g} GB"})

    parent, child = mp.get_context("fork").Pipe(duplex=False)
    proc = mp.get_context("fork").Process(target=target, args=(child,))
    proc.start()
    child.close()
    if CHILD_TIMEOUT[0] is not None and not parent.poll(CHILD_TIMEOUT[0]):
        proc.kill()
        proc.join()
        return {"ok": False, "error": f"timed out after {CHILD_TIMEOUT[0]:g} s"}
    try:
        out = parent.recv()
    except EOFError:
        out = {"ok": False, "error": f"the process died (exit code {proc.exitcode}; memory limit {memory_gb:g} GB)"}
    proc.join()
    return out


def check_speedup(masked: torch.nn.Module, x: torch.Tensor, masks: dict, engine: str) -> dict:
    model = copy.deepcopy(masked)
    t0 = time.perf_counter()
    try:
        if engine == "ours":
            speedup(model, x, masks)
        else:
            from de_plugin_nni.tracing import speedup as nni_speedup
            by_module: dict = {}
            for k, m in masks.items():
                mod, _, p = k.rpartition(".")
                by_module.setdefault(mod, {})[p] = m.float()
            nni_speedup(model, x, by_module, engine="nni")  # NNI alone: where ModelSpeedup itself works
    except Exception as exc:  # noqa: BLE001 - the table records the failure
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                "seconds": time.perf_counter() - t0}
    with torch.no_grad():
        diff = rel_diff(masked(x), model.eval()(x))
    macs = count_macs(model, x)
    return {"ok": diff <= 1e-4, "rel_diff": diff, "params_after": macs["params_dense"], "macs_after": macs["macs_dense"],
            "seconds": time.perf_counter() - t0}


def run_torch_pruning(name: str, x: torch.Tensor, ratio: float) -> dict:
    import torch_pruning as tp

    model = build(name)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]
    t0 = time.perf_counter()
    try:
        before = sum(p.numel() for p in model.parameters())
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=head)
        pruner.step()
        with torch.no_grad():
            out = model(x)
        after = sum(p.numel() for p in model.parameters())
        return {"ok": after < before and tuple(out.shape) == (x.shape[0], 10), "params_after": after,
                "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                "seconds": time.perf_counter() - t0}


def one(name: str, args) -> dict:
    x = torch.randn(2, 3, input_size(name), input_size(name))
    t0 = time.perf_counter()
    row: dict = {"model": name, "input": input_size(name)}
    try:
        base, masked, masks = run_ours(build(name), x, args.ratio)
        row.update(base)
        row["ours"] = check_speedup(masked, x, masks, "ours")
        if args.nni:
            row["nni"] = in_child(check_speedup, masked, x, masks, "nni")
    except Exception as exc:  # noqa: BLE001 - a refusal is a row too
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    row["seconds"] = time.perf_counter() - t0
    if args.tp:
        row["torch_pruning"] = in_child(run_torch_pruning, name, x, args.ratio)
    return row


def table(rows: list[dict], args) -> str:
    head = "| model | layers | groups (pruned / locked / unresolved) | channels removed | ours: equal, rel diff | params | MACs |"
    sep = "|---|---|---|---|---|---|---|"
    if args.nni:
        head += " NNI ModelSpeedup |"
        sep += "---|"
    if args.tp:
        head += " Torch-Pruning |"
        sep += "---|"
    lines = [head + " s |", sep + "---|"]
    for r in rows:
        if "error" in r:
            cells = [r["model"], "", "", "", f"refused: {r['error'][:140]}", "", ""]
        else:
            o = r["ours"]
            eq = f"{'yes' if o['ok'] else 'NO'}, {o['rel_diff']:.0e}" if "rel_diff" in o else f"failed: {o['error']}"
            skip = " (unresolved='skip')" if "refused_first" in r else ""
            cells = [r["model"] + skip, str(r["layers"]), f"{r['groups']} ({r['pruned_groups']} / {r['locked']} / {r['unresolved']})",
                     f"{r['channels_removed']} / {r['channels']}", eq,
                     f"{r['params_before'] / 1e6:.2f}M -> {o.get('params_after', r['params_before']) / 1e6:.2f}M",
                     f"{r['macs_before'] / 1e6:.0f}M -> {o.get('macs_after', r['macs_before']) / 1e6:.0f}M"]
        if args.nni:
            n = r.get("nni", {})
            cells.append("" if not n else (f"{'equal' if n['ok'] else 'NOT equal'} ({n['rel_diff']:.0e})"
                                           if "rel_diff" in n else f"failed: {n['error'][:80]}"))
        if args.tp:
            t = r.get("torch_pruning", {})
            cells.append("" if not t else ("smaller, runs" if t["ok"] else f"failed: {t.get('error', 'not smaller')[:80]}"))
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict], args) -> str:
    n = len(rows)
    ours = sum(1 for r in rows if r.get("ours", {}).get("ok") and r["ours"]["params_after"] < r["params_before"])
    skipped = sum(1 for r in rows if "refused_first" in r)
    out = [f"{n} models; ours: smaller and output-equal on {ours} ({100 * ours / n:.0f}%), {skipped} of them with "
           "unresolved='skip' after the first call named the ops it cannot follow"]
    if args.nni:
        tried = [r for r in rows if "nni" in r]
        nni = sum(1 for r in tried if r["nni"].get("ok"))
        both = sum(1 for r in tried if r["nni"].get("ok") and r.get("ours", {}).get("ok"))
        out.append(f"NNI ModelSpeedup on the same masks ({len(tried)} models tried): output-equal on {nni}; "
                   f"ours on {sum(1 for r in tried if r.get('ours', {}).get('ok'))} of them, both on {both}")
    if args.tp:
        tried = [r for r in rows if "torch_pruning" in r]
        tpn = sum(1 for r in tried if r["torch_pruning"].get("ok"))
        out.append(f"Torch-Pruning MetaPruner ({len(tried)} models tried): a smaller model that runs on {tpn}")
    return "; ".join(out)


def merged(out: Path, others: list[Path], args) -> None:
    """One table from runs of the same protocol: ours from ``out``, NNI / Torch-Pruning from ``others``."""
    rows = json.loads((out / "results.json").read_text())
    by_name = {r["model"]: r for r in rows}
    for folder in others:
        for r in json.loads((folder / "results.json").read_text()):
            for key in ("nni", "torch_pruning"):
                if key in r and r["model"] in by_name:
                    by_name[r["model"]][key] = r[key]
    args.nni = any("nni" in r for r in rows)
    args.tp = any("torch_pruning" in r for r in rows)
    text = table(rows, args) + "\n\n" + summary(rows, args) + "\n"
    (out / "table.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="only these (default: every classification model)")
    ap.add_argument("--ratio", type=float, default=0.25, help="feature_map_ratio and linear_ratio")
    ap.add_argument("--nni", action="store_true", help="also NNI's ModelSpeedup on the same masks")
    ap.add_argument("--tp", action="store_true", help="also Torch-Pruning's MetaPruner (pip install torch-pruning)")
    ap.add_argument("--huge", action="store_true", help=f"include {sorted(HUGE)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds for each NNI / Torch-Pruning child")
    ap.add_argument("--out", default="benchmarks/results/zoo")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out's results.json")
    ap.add_argument("--merge", nargs="*", default=[], help="re-make --out's table, taking the NNI and Torch-Pruning "
                                                           "columns from these runs' results.json")
    args = ap.parse_args()
    CHILD_TIMEOUT[0] = args.child_timeout
    if args.merge:
        merged(Path(args.out), [Path(d) for d in args.merge], args)
        return
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    names = args.models or [n for n in models.list_models(module=models) if args.huge or n not in HUGE]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads((out / "results.json").read_text()) if args.resume and (out / "results.json").exists() else []
    done = {r["model"] for r in rows}
    for name in names:
        if name in done:
            continue
        rows.append(one(name, args))
        r = rows[-1]
        print(f"{name:22s} {r.get('error') or r['ours']} ({r['seconds']:.0f}s)", flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
        gc.collect()
    text = table(rows, args) + "\n\n" + summary(rows, args) + "\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
