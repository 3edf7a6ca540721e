"""Converged dense references for the benchmarks: each model trained once, cached and shipped.

Every pruning benchmark starts from one of these, so a "drop" is measured from a model that has
finished learning, not from one still improving (an under-trained reference makes every pruned
model look better than its parent and lets seed noise swamp the differences being measured).

Data: Fashion-MNIST, all 60,000 training images: 55,000 to train on, 5,000 held out (seeded) as
the validation split that searches and selections score on; the full 10,000-image test split is
read only for the tables. The deep models see the images zero-padded to 32x32, LeNet-300-100 the
flat 28x28 pixels.

Recipe (per model, ``RECIPES``): SGD with Nesterov momentum (AdamW for the ViT), one-cycle
schedule, weight decay, random 32x32 crops of the 4-pixel padded image and horizontal flips for
the CNNs and the ViT. ``FINETUNE`` is the matching short fine-tune recipe the pruning benchmarks
use (same optimiser family, lower learning rate, cosine to zero).

Weights are looked up in ``benchmarks/references/`` (the ones the repository ships, listed with
their accuracies, the device that trained them and a SHA-256 in ``manifest.json``), then in
``~/.cache/de_plugin/references``; ``load_reference`` never trains silently (a ResNet-20 takes most
of an hour on 2 CPU cores, a MobileNetV2 about three hours, resumed over sittings from a checkpoint),
it says which command makes the file. The file name hashes the recipe only: the same recipe trained on
other hardware gives other weights under the same name, so results files record :func:`identity` (name
and SHA-256) and refuse to resume or pair cells measured from other weights.

    python benchmarks/references.py --models resnet20 mobilenetv2 vit lenet300 --device cuda
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))  # cells.py, also when imported from elsewhere
from cells import check_protocol  # noqa: E402
from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset  # noqa: E402
from de_plugin.demo.models import create_model  # noqa: E402
from de_plugin.demo.training import make_evaluate  # noqa: E402

log = logging.getLogger("references")
SHIPPED = ROOT / "references"
CACHE = Path(os.environ.get("DE_PLUGIN_CACHE", Path.home() / ".cache" / "de_plugin")) / "references"
VAL_SIZE = 5000

RECIPES = {
    "resnet20": {"epochs": 30, "opt": "sgd", "lr": 0.2, "wd": 5e-4, "batch": 256, "augment": True, "size": 32},
    "mobilenetv2": {"epochs": 30, "opt": "sgd", "lr": 0.2, "wd": 4e-5, "batch": 256, "augment": True, "size": 32},
    "vit": {"epochs": 40, "opt": "adamw", "lr": 2e-3, "wd": 0.05, "batch": 256, "augment": True, "size": 32},
    "lenet300": {"epochs": 30, "opt": "sgd", "lr": 0.1, "wd": 1e-4, "batch": 256, "augment": False, "size": None},
}
# the fine-tune the pruning benchmarks give every method: one optimiser per model family, cosine to zero
FINETUNE = {
    "resnet20": {"opt": "sgd", "lr": 0.01, "wd": 5e-4, "batch": 256, "augment": True},
    "mobilenetv2": {"opt": "sgd", "lr": 0.01, "wd": 4e-5, "batch": 256, "augment": True},
    "vit": {"opt": "adamw", "lr": 2e-4, "wd": 0.05, "batch": 256, "augment": True},
    "lenet300": {"opt": "sgd", "lr": 0.01, "wd": 1e-4, "batch": 256, "augment": False},
}


def model_kwargs(name: str) -> dict:
    return {} if name == "lenet300" else {"in_channels": 1}


def load_data(name: str, device: str = "cpu"):
    """The reference's splits (train 55,000 / val 5,000 / test 10,000), tensors on ``device``;
    ``FASHION_MNIST`` (a folder of IDX files) overrides the Debian package's folder."""
    size = RECIPES[name]["size"]
    data = load_idx_dataset(os.environ.get("FASHION_MNIST", FASHION_MNIST_DIR), val_size=VAL_SIZE, size=size)
    for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        t = getattr(data, key)
        if name == "lenet300" and key.startswith("x"):
            t = t.reshape(len(t), -1)
        setattr(data, key, t.to(device))
    return data


def tag(name: str) -> str:
    """File name: model, data, and a hash of everything that shapes the weights."""
    key = json.dumps({"model": name, "kwargs": model_kwargs(name), "recipe": RECIPES[name], "val": VAL_SIZE,
                      "data": "fashion-mnist"}, sort_keys=True)
    return f"{name}_fashion-mnist_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel translations (crops of the zero-padded image) and horizontal flips, per image."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def optimiser(model: nn.Module, opt: str, lr: float, wd: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, recipe: dict, seed: int,
                schedule: str = "onecycle", masks: list | None = None, on_step=None,
                checkpoint: Path | None = None, checkpoint_every: int = 50) -> None:
    """``steps`` gradient steps over shuffled epochs of (x, y); ``masks`` ([(parameter, bool mask)]) are
    re-applied after every step so pruned weights stay zero; ``on_step(step)`` after each step.

    ``checkpoint``: a file the run's whole state (weights, optimiser, schedule, the shuffle's and the
    augmentation's random state, the place in the epoch) is written to every ``checkpoint_every`` steps and
    resumed from when it exists: a reference that trains for hours on a CPU is stopped and continued over
    several sittings and ends with the weights of one uninterrupted run."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = optimiser(model, recipe["opt"], recipe["lr"], recipe["wd"])
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.15)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    parts = {"model": model, "opt": opt, "sched": sched}
    run = {"steps": steps, "recipe": recipe, "seed": seed, "schedule": schedule}
    step, perm, i = 0, None, 0
    if checkpoint is not None and checkpoint.exists():
        step, perm, i = _resume(checkpoint, parts, gen, run)
    dev_type = x.device.type
    model.train()
    bs = recipe["batch"]
    while step < steps:
        if perm is None:
            perm, i = torch.randperm(len(y), generator=gen).to(x.device), 0
        while i <= len(y) - bs and step < steps:
            idx = perm[i : i + bs]
            xb = augment(x[idx]) if recipe.get("augment") else x[idx]
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=dev_type == "cuda"):
                loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if masks:
                with torch.no_grad():
                    for p, m in masks:
                        p.mul_(m)
            step, i = step + 1, i + bs
            if checkpoint is not None and step % checkpoint_every == 0 and step < steps:
                _save_checkpoint(checkpoint, parts, gen, run, step, perm, i)
            if on_step is not None:
                on_step(step)
        perm = None
    model.eval()


def _save_checkpoint(path: Path, parts: dict, gen: torch.Generator, run: dict, step: int,
                     perm: torch.Tensor, i: int) -> None:
    """Written beside and renamed over, so a run killed while writing leaves the previous checkpoint whole."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(run=run, step=step, perm=perm.cpu(), i=i, gen=gen.get_state(), rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path, parts: dict, gen: torch.Generator, run: dict) -> tuple[int, torch.Tensor, int]:
    """Restores a checkpoint of the same run (steps, recipe, seed, schedule; refused otherwise, naming the file
    to delete) and returns where it stopped: the step, the epoch's shuffle and the place in it."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["run"] != run:
        raise ValueError(f"{path} is a checkpoint of another run ({state['run']}, not {run}): delete it to "
                         f"start this one afresh")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log.info("resumed %s at step %d of %d", path, state["step"], run["steps"])
    device = next(parts["model"].parameters()).device
    return state["step"], state["perm"].to(device), state["i"]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy on fixed tensors (eval mode, no gradients): the demo's evaluator."""
    return make_evaluate(x, y, batch_size=2500)(model)


def train_reference(name: str, device: str, seed: int = 0, checkpoint: Path | None = None) -> tuple[nn.Module, dict]:
    """Trains ``name`` by its recipe; ``checkpoint`` makes the run resumable (see :func:`train_steps`).

    Convolutional models train in channels-last layout: on a CPU it makes MobileNetV2's depthwise
    convolutions about 1.5x faster (1.7 s against 2.5 s a step of 256 on 2 cores); the saved weights are
    contiguous as before."""
    recipe = RECIPES[name]
    data = load_data(name, device)
    torch.manual_seed(seed)
    model = create_model(name, **model_kwargs(name)).to(device)
    layout = torch.channels_last if any(isinstance(m, nn.Conv2d) for m in model.modules()) else torch.contiguous_format
    model = model.to(memory_format=layout)
    steps = max(1, int(recipe["epochs"] * (len(data.y_train) // recipe["batch"])))
    resumed = checkpoint is not None and checkpoint.exists()
    t0 = time.perf_counter()
    last = [t0, t0]  # last line logged, last validation

    def report(step: int) -> None:  # a line every 30 s, the validation accuracy every 10 minutes and at the end
        now = time.perf_counter()
        if now - last[0] > 30 or step == steps:
            last[0] = now
            val = ""
            if now - last[1] > 600 or step == steps:
                last[1] = now
                val = f", val {accuracy(model, data.x_val, data.y_val):.4f}"
                model.train()
            log.info("%s step %d/%d (%.0f s)%s", name, step, steps, now - t0, val)

    train_steps(model, data.x_train, data.y_train, steps, recipe, seed, on_step=report, checkpoint=checkpoint)
    model = model.to(memory_format=torch.contiguous_format)
    info = {"model": name, "recipe": recipe, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "val": accuracy(model, data.x_val, data.y_val), "test": accuracy(model, data.x_test, data.y_test),
            "train_images": len(data.y_train), "val_images": len(data.y_val), "test_images": len(data.y_test)}
    if resumed:
        info["resumed"] = "seconds counts the last sitting only: the run resumed from a checkpoint"
    return model.cpu(), info


def find_reference(name: str) -> Path | None:
    for folder in (SHIPPED, CACHE):
        path = folder / f"{tag(name)}.pt"
        if path.exists():
            return path
    return None


def _found(name: str) -> Path:
    """The reference's file; a clear error naming the command that makes it when there is none."""
    if name not in RECIPES:
        raise ValueError(f"no reference recipe for {name!r}; known: {sorted(RECIPES)}")
    path = find_reference(name)
    if path is None:
        raise FileNotFoundError(
            f"no converged {name} reference ({tag(name)}.pt) in {SHIPPED} or {CACHE}: run "
            f"`python benchmarks/references.py --models {name}` (add --device cuda where a GPU is present)")
    return path


def identity(name: str) -> str:
    """Which weights a study starts from: the file's name and the first 12 hex digits of its SHA-256.

    The file name only hashes the recipe, and a reference retrained on other hardware keeps it while its
    weights (and accuracy) differ; results files record this instead, so cells measured from one set of
    weights are never resumed beside, or paired with, cells from another."""
    path = _found(name)
    return f"{path.stem}@{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


def check_weights(path: Path, saved: dict, models: list[str]) -> dict:
    """``saved`` (model -> :func:`identity`, as a results file recorded it) checked against the weights found
    now for ``models``: refused, naming both, when a model's cells came from other weights; returned with
    ``models``' identities added."""
    now = {m: identity(m) for m in models}
    both = [m for m in now if m in saved]
    check_protocol(path, {m: saved[m] for m in both}, {m: now[m] for m in both})
    return {**saved, **now}


def load_reference(name: str) -> tuple[nn.Module, dict]:
    """The converged reference and its manifest entry (accuracies, recipe); a clear error if absent."""
    path = _found(name)
    manifest = json.loads((path.parent / "manifest.json").read_text()) if (path.parent / "manifest.json").exists() else {}
    entry = manifest.get(name, {})
    if entry.get("sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        raise ValueError(f"{path} does not match the SHA-256 in its manifest.json (a damaged or replaced file): "
                         f"delete it and run `python benchmarks/references.py --models {name}`")
    model = create_model(name, **model_kwargs(name))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), entry


def save_reference(name: str, model: nn.Module, info: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag(name)}.pt"
    torch.save(model.state_dict(), path)
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    manifest[name] = {**info, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    mpath.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(CACHE), help=f"folder for the weights and manifest.json (default {CACHE}; "
                                                       f"the shipped ones live in {SHIPPED})")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=None, help="override every recipe's epochs (a smoke run; the "
                                                                "file name changes with it)")
    args = ap.parse_args()
    for name in args.models:
        if args.epochs is not None:
            RECIPES[name]["epochs"] = args.epochs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    print("| model | val | test (10,000) | steps | seconds | device |\n|---|---|---|---|---|---|")
    for name in args.models:
        partial = Path(args.out) / f"{tag(name)}.partial.pt"  # resumed when a sitting was stopped mid-run
        model, info = train_reference(name, args.device, checkpoint=partial)
        save_reference(name, model, info, Path(args.out))
        partial.unlink(missing_ok=True)
        print(f"| {name} | {info['val']:.4f} | {info['test']:.4f} | {info['steps']} | {info['seconds']:.0f} | "
              f"{info['device']} |", flush=True)


if __name__ == "__main__":
    main()
