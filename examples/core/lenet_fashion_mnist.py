"""de_layerwise on LeNet-5 / Fashion-MNIST with the plain-callable API (no framework).

    python examples/core/lenet_fashion_mnist.py --sparsity 0.95   # about 4.5 minutes on 2 CPU cores

(measured 261 s on an idle 2-core machine: LeNet-5 trained 4 epochs, then 4 rounds of de_layerwise)
"""
import argparse

import torch

import de_plugin
from de_plugin.demo.data import load_idx_dataset
from de_plugin.demo.models import LeNet5
from de_plugin.report import format_table
from de_plugin.demo.training import make_evaluate, make_finetune, train

ap = argparse.ArgumentParser()
ap.add_argument("--sparsity", type=float, default=0.95)
ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
args = ap.parse_args()

data = load_idx_dataset(args.data)
model = train(LeNet5(), data.x_train, data.y_train, epochs=4, seed=0, progress=True)
val = make_evaluate(data.x_val[:2000], data.y_val[:2000])  # the search's validation split
test = make_evaluate(data.x_test, data.y_test)  # only reported
finetune = make_finetune(data.x_train[:20000], data.y_train[:20000])

torch.manual_seed(0)
result = de_plugin.prune(
    model, "de_layerwise", evaluate=val, finetune=finetune, sparsity=args.sparsity,
    rounds=4, finetune_epochs=2, population=12, generations=8,
)
print(format_table(result, {"test accuracy": f"{test(model):.4f} -> {test(result.model):.4f}"}))
