"""Plain training / evaluation callables for the examples, tests and benchmarks.

They implement the core's contract: ``evaluate(model) -> float`` and ``finetune(model, epochs)``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from ..progress import progress_bar

from ..evaluation import inference
from .models import create_model


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer; CPU for modules with neither (quantized models)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def make_evaluate(x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> Callable[[nn.Module], float]:
    """Accuracy on fixed tensors (eval mode, no gradients)."""

    def evaluate(model: nn.Module) -> float:
        dev = model_device(model)
        correct = 0
        with inference(model):
            for i in range(0, len(y), batch_size):
                correct += int((model(x[i : i + batch_size].to(dev)).argmax(1) == y[i : i + batch_size].to(dev)).sum())
        return correct / len(y)

    return evaluate


def make_finetune(
    x: torch.Tensor, y: torch.Tensor, lr: float = 5e-4, batch_size: int = 128, progress: bool = False,
    max_steps: int | None = None,
) -> Callable[[nn.Module, int], None]:
    """Adam training for whole epochs over (x, y); the returned callable counts its steps.

    ``finetune.steps`` accumulates the gradient steps taken, so benchmarks can show every
    method got the same training budget.
    """

    def finetune(model: nn.Module, epochs: int) -> None:
        dev = next(model.parameters()).device
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for ep in range(epochs):
            perm = torch.randperm(len(y))
            it = range(0, len(y), batch_size)
            for i in progress_bar(it, desc=f"fine-tune epoch {ep + 1}/{epochs}", enabled=progress):
                if max_steps is not None and finetune.steps >= max_steps:
                    return
                idx = perm[i : i + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx].to(dev)), y[idx].to(dev))
                loss.backward()
                opt.step()
                finetune.steps += 1

    finetune.steps = 0
    return finetune


def train(model: nn.Module, x, y, epochs: int, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
          progress: bool = False) -> nn.Module:
    """Train a dense model from scratch (seeded)."""
    torch.manual_seed(seed)
    make_finetune(x, y, lr=lr, batch_size=batch_size, progress=progress)(model, epochs)
    return model


CACHE = Path(os.environ.get("DE_PLUGIN_CACHE", Path.home() / ".cache" / "de_plugin"))


def dense_model(name: str, data, epochs: int, seed: int, data_dir: str, lr: float = 1e-3,
                **model_kwargs) -> torch.nn.Module:
    """Train the dense reference once and cache its weights outside the repository.

    The same arguments give the same weights on the same machine and thread count (initialisation and
    training are both seeded with ``seed``), whatever the process did before.

    ``model_kwargs`` go to ``create_model`` (e.g. ``in_channels=1`` for the deep models on
    Fashion-MNIST) and into the cache key, with the image size and ``lr``.
    """
    torch.manual_seed(seed)  # the initial weights too: else they follow whatever drew random numbers before
    model = create_model(name, **model_kwargs)
    extra = "".join(f"_{k}{v}" for k, v in sorted(model_kwargs.items()))
    extra += ("" if data.x_train.shape[-1] == 28 else f"_px{data.x_train.shape[-1]}") + ("" if lr == 1e-3 else f"_lr{lr:g}")
    tag = f"{name}_{Path(data_dir).name}_e{epochs}_s{seed}_n{len(data.y_train)}{extra}.pt"
    path = CACHE / tag
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        logging.info("loaded cached dense model %s", path)
        return model
    logging.info("training dense %s for %d epochs", name, epochs)
    train(model, data.x_train, data.y_train, epochs=epochs, lr=lr, seed=seed, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model
