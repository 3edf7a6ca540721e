"""Shared fixtures: a tiny MLP trained on scikit-learn's digits (real data, seconds to train)."""
import copy
import os
import re

# Ray 2.60 picks its auth mode once per process: the cluster test's `ray start` nodes and every local
# ray.init() in this process must agree (token auth needs a shared token file on every node)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch
from torch import nn

#: what CI installs: there a test skipped because one of these is missing is a failure, not a skip
REQUIRED_IN_CI = ("nni", "pytorch_lightning", "tensorboard", "neural_compressor", "ray", "importlinter",
                  "import-linter", "onnxruntime", "dataset-fashion-mnist")


def _missing_in_ci(report) -> bool:
    if os.environ.get("CI") != "true" or not report.skipped:
        return False
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    return any(f"could not import '{m}'" in reason or re.search(rf"\b{re.escape(m)}\b.*not installed", reason)
               for m in REQUIRED_IN_CI)


def _fail(report) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"CI=true: a dependency CI installs is missing, so this is a failure, not a skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped at import (``pytest.importorskip`` at module level) fails in CI."""
    outcome = yield
    report = outcome.get_result()
    if _missing_in_ci(report):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped for a missing dependency fails in CI."""
    outcome = yield
    report = outcome.get_result()
    if _missing_in_ci(report):
        _fail(report)

from de_plugin.demo.data import load_digits_dataset
from de_plugin.demo.training import make_evaluate, make_finetune, train


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="session")
def digits():
    return load_digits_dataset(val_size=300, test_size=300, seed=0)


@pytest.fixture(scope="session")
def _trained(digits):
    torch.manual_seed(0)
    m = MLP()
    train(m, digits.x_train, digits.y_train, epochs=30, lr=3e-3, batch_size=64, seed=0)
    return m


@pytest.fixture
def mlp(_trained):
    return copy.deepcopy(_trained)


@pytest.fixture
def evaluate(digits):
    return make_evaluate(digits.x_val, digits.y_val)


@pytest.fixture
def finetune(digits):
    return make_finetune(digits.x_train, digits.y_train, lr=1e-3, batch_size=64)


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def nni_evaluator(model, digits, evaluate):
    """An NNI TorchEvaluator on the digits data (Adam, cross-entropy), for the adapter tests."""
    import nni
    import torch.nn.functional as F
    from nni.compression import TorchEvaluator

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        steps = 0
        for _ in range(max_epochs or 100):
            perm = torch.randperm(len(digits.y_train))
            for i in range(0, len(perm), 64):
                idx = perm[i : i + 64]
                optimizers.zero_grad()
                training_step((digits.x_train[idx], digits.y_train[idx]), model).backward()
                optimizers.step()
                steps += 1
                if max_steps and steps >= max_steps:
                    return

    def training_step(batch, model):
        return F.cross_entropy(model(batch[0]), batch[1])

    opt = nni.trace(torch.optim.Adam)(model.parameters(), lr=1e-3)
    return TorchEvaluator(training_func, opt, training_step, evaluating_func=evaluate, dummy_input=digits.x_val[:2])


@pytest.fixture(scope="session")
def images(digits):
    """The digits as 1x8x8 images, with training batches of 64 and validation batches of 128."""
    class D:
        x = digits.x_train.reshape(-1, 1, 8, 8)
        y = digits.y_train
        xv = digits.x_val.reshape(-1, 1, 8, 8)
        yv = digits.y_val

    D.batches = [(D.x[i:i + 64], D.y[i:i + 64]) for i in range(0, len(D.y), 64)]
    D.val = [(D.xv[i:i + 128], D.yv[i:i + 128]) for i in range(0, len(D.yv), 128)]
    return D


@pytest.fixture(scope="session")
def _resnet(images):
    from de_plugin.demo.models import SmallResNet

    torch.manual_seed(0)
    return train(SmallResNet(widths=(8, 16, 16)), images.x, images.y, epochs=8, lr=3e-3, batch_size=64, seed=0)


@pytest.fixture
def resnet(_resnet):
    """A trained residual CNN with BatchNorm (a fresh copy per test)."""
    return copy.deepcopy(_resnet)
