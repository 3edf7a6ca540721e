"""Shared assets of the NNI host-conformance scenarios, written after NNI v3.0's
``test/algo/compression/assets`` (``simple_mnist``, ``common.create_model``): the same small
conv net (a grouped conv, BatchNorm, a residual-style sum, a large Linear), the same legacy
config_list, a TorchEvaluator and a LightningEvaluator. Data: a Fashion-MNIST subset from
Debian's package instead of a download (28x28, as upstream)."""
from __future__ import annotations

import nni
from nni.compression import LightningEvaluator, TorchEvaluator
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset

STEPS = 12  # training steps a TorchEvaluator call runs at most (upstream: 100 on full MNIST)


def fashion_subset():
    s = load_idx_dataset(FASHION_MNIST_DIR, val_size=256, train_limit=384, seed=0)
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
        return nni.trace(torch.optim.SGD)(self.parameters(), lr=0.01, momentum=0.9)


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
            for i in range(0, len(y), 32):
                optimizer.zero_grad()
                criterion(model(x[i:i + 32]), y[i:i + 32]).backward()
                optimizer.step()
                steps += 1
                if steps >= (max_steps or STEPS):
                    return

    opt = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9)
    return TorchEvaluator(training, opt, F.nll_loss, dummy_input=xv[:8],
                                          evaluating_func=accuracy(xv, yv))


def lightning_evaluator(data):
    x, y, xv, yv = data

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=32)

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
