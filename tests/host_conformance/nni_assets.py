"""Shared assets of the NNI host-conformance scenarios, written after NNI v3.0's
``test/algo/compression/assets`` (``simple_mnist``, ``common.create_model``) and the checks of
``test/algo/compression/pruning/test_pruner.py`` (``check_masks``, ``check_pruned_simple_model``):
the same small conv net (a grouped conv, BatchNorm, a residual-style sum, a large Linear), the same
legacy config_list, the same optimizer (SGD lr 0.01, momentum 0.9, weight decay 5e-4, ExponentialLR
0.1 per epoch), 100 training steps of batch 32, a TorchEvaluator and a LightningEvaluator.

Differences from upstream: Fashion-MNIST from Debian's package instead of MNIST downloaded by
torchvision (28x28 as upstream, no normalisation); 3,200 training images (upstream's 100 steps of
batch 32 see exactly as many) and 256 validation images for evaluation (upstream: the 10,000 test
images); the Lightning trainer has no TensorBoard logger and no progress bar, and its model logs
plain accuracy (upstream: torchmetrics' ``accuracy``)."""
from __future__ import annotations

import nni
from nni.compression import LightningEvaluator, TorchEvaluator
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR
from torch.utils.data import DataLoader, TensorDataset

from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset

STEPS = 100  # training steps an evaluator call runs when not told otherwise (upstream: 100)
BATCH = 32


def fashion_subset():
    s = load_idx_dataset(FASHION_MNIST_DIR, val_size=256, train_limit=STEPS * BATCH, seed=0)
    return s.x_train, s.y_train, s.x_val, s.y_val


class SimpleTorchModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, groups=4), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 24 * 24, 100), nn.Linear(100, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x)) + self.bn3(self.conv3(x))
        return F.log_softmax(self.fc2(self.fc1(x.reshape(x.shape[0], -1))), -1)


class SimpleLightningModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = SimpleTorchModel()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        return F.nll_loss(self(batch[0]), batch[1])

    def test_step(self, batch, _):
        self.log("default", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        opt = nni.trace(torch.optim.SGD)(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": nni.trace(ExponentialLR)(opt, 0.1), "interval": "epoch"}}


def config_list(model_type: str) -> list:
    """Upstream's legacy config_list (``sparsity``, ``exclude``), which NNI 3.0 still accepts."""
    p = "model." if model_type == "lightning" else ""
    return [{"op_types": ["Linear"], "sparsity": 0.75},
            {"op_names": [f"{p}conv1", f"{p}conv2", f"{p}conv3"], "sparsity": 0.75},
            {"op_names": [f"{p}fc2"], "exclude": True}]


def accuracy(x, y):
    def evaluate(model):
        was = model.training
        model.eval()
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        model.train(was)
        return acc

    return evaluate


def torch_evaluator(model, data):
    x, y, xv, yv = data

    def training(model, optimizer, criterion, lr_scheduler=None, max_steps=None, max_epochs=None):
        model.train()
        steps = 0
        for _ in range(max_epochs or 1):
            for i in range(0, len(y), BATCH):
                optimizer.zero_grad()
                criterion(model(x[i:i + BATCH]), y[i:i + BATCH]).backward()
                optimizer.step()
                steps += 1
                if steps >= (max_steps or STEPS):
                    return
            if lr_scheduler is not None:
                lr_scheduler.step()

    opt = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return TorchEvaluator(training, opt, F.nll_loss, nni.trace(ExponentialLR)(opt, 0.1), dummy_input=xv[:8],
                          evaluating_func=accuracy(xv, yv))


def lightning_evaluator(data):
    x, y, xv, yv = data

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=BATCH)

        def test_dataloader(self):
            return DataLoader(TensorDataset(xv, yv), batch_size=256)

    trainer = nni.trace(pl.Trainer)(accelerator="cpu", devices=1, max_epochs=1, max_steps=STEPS, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return LightningEvaluator(trainer, nni.trace(Data)(), dummy_input=xv[:8])


def create(model_type: str, data):
    """(model, evaluator, config_list, dummy_input), as upstream's ``create_model`` + evaluator."""
    torch.manual_seed(0)
    if model_type == "lightning":
        model = SimpleLightningModel()
        return model, lightning_evaluator(data), config_list(model_type), data[2][:8]
    model = SimpleTorchModel()
    return model, torch_evaluator(model, data), config_list(model_type), data[2][:8]


def entry_layers(model_type: str) -> list[list[str]]:
    p = "model." if model_type == "lightning" else ""
    return [[f"{p}fc1"], [f"{p}conv1", f"{p}conv2", f"{p}conv3"]]


def sparsity_of(mask: torch.Tensor) -> float:
    return 1 - float(mask.sum()) / mask.numel()


def check_masks(masks: dict, model_type: str, layers: tuple = ("conv1", "conv2", "conv3", "fc1")) -> None:
    """Upstream's ``check_masks``: every layer exactly 0.75 sparse, each bias mask the weight mask's
    kept rows, and the summed convs (conv2, conv3) keeping the same channels."""
    p = "model." if model_type == "lightning" else ""
    for n in layers:
        w = masks[f"{p}{n}"]["weight"]
        assert sparsity_of(w) == 0.75, (n, sparsity_of(w))
        rows = w.sum(list(range(1, w.dim()))).bool().float()
        assert torch.equal(rows, masks[f"{p}{n}"]["bias"]), f"{n}: the bias mask does not follow the weight mask"
    rows = [masks[f"{p}conv{i}"]["weight"].sum([1, 2, 3]).bool() for i in (2, 3)]
    assert torch.equal(rows[0], rows[1]), "conv2 and conv3 are summed: they must keep the same channels"


def check_pruned_simple_model(model: nn.Module, ori_model: nn.Module, dummy_input, model_type: str,
                              layers: tuple = ("conv1", "conv2", "conv3", "fc1")) -> None:
    """Upstream's ``check_pruned_simple_model``: the sped-up model runs and each layer keeps a quarter
    of its output channels."""
    model(dummy_input)
    if model_type == "lightning":
        model, ori_model = model.model, ori_model.model
    for n in layers:
        kept = getattr(model, n).weight.shape[0] / getattr(ori_model, n).weight.shape[0]
        assert 1 - kept == 0.75, (n, kept)
