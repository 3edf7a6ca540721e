"""ResNet-20 (22 pruned layers) / Fashion-MNIST 32x32: de_layerwise inside Intel Neural Compressor's
pruning loop (3.7 route), searched by stage (5 values plus per-layer offsets), then INC static int8
quantization. Prints per-layer sparsity and test accuracy dense / pruned / int8.

    python examples/inc/resnet20_inc.py   # about 2 minutes on 2 CPU cores, 80% sparse; the dense model is a
                                          # short run, so the printed accuracies move with the machine
"""
import argparse

import torch
import torch.nn.functional as F
from neural_compressor.training import WeightPruningConfig, prepare_compression
from torch.utils.data import DataLoader, TensorDataset

import de_plugin_inc  # registers pruning_type="de_layerwise" with INC
from de_plugin.demo.data import load_idx_dataset
from de_plugin.demo.models import create_model
from de_plugin.demo.training import make_evaluate, train

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
ap.add_argument("--sparsity", type=float, default=0.8)
ap.add_argument("--epochs", type=int, default=3, help="dense training epochs (fine-tuning uses 2)")
ap.add_argument("--train-limit", type=int, default=4000)
args = ap.parse_args()

torch.manual_seed(0)
data = load_idx_dataset(args.data, train_limit=args.train_limit, val_size=1000, test_limit=2000, size=32)
model = train(create_model("resnet20", in_channels=1), data.x_train, data.y_train, epochs=args.epochs, seed=0,
              progress=True)
val = make_evaluate(data.x_val[:500], data.y_val[:500])  # the search's fitness (validation split)
test = make_evaluate(data.x_test, data.y_test)
dense_test = test(model)

steps_per_epoch = -(-len(data.y_train) // 128)  # prune during the first epoch, fine-tune in the second
config = WeightPruningConfig(
    [{"op_names": ["stem.*", "layer.*", "fc"], "pruning_type": "de_layerwise", "eval_func": val,
      "de_options": {"generations": 4, "groups": "stage"}}],
    target_sparsity=args.sparsity, pattern="1x1", start_step=0, end_step=steps_per_epoch,
    pruning_frequency=max(1, steps_per_epoch // 2),
)
manager = prepare_compression(model, config)
opt = torch.optim.Adam(model.parameters(), lr=5e-4)
manager.callbacks.on_train_begin()
step = 0
for epoch in range(2):  # INC's usual training loop with its callbacks
    perm = torch.randperm(len(data.y_train))
    for i in range(0, len(perm), 128):
        idx = perm[i : i + 128]
        manager.callbacks.on_step_begin(step)
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        manager.callbacks.on_before_optimizer_step()
        opt.step()
        manager.callbacks.on_after_optimizer_step()
        opt.zero_grad()
        manager.callbacks.on_step_end()
        step += 1
manager.callbacks.on_train_end()
pruned_test = test(model)

names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
print(f"{'layer':24s} {'params':>8s} {'sparsity':>9s}")
total = zeros = 0
for name in names:
    w = model.get_submodule(name).weight
    total, zeros = total + w.numel(), zeros + int((w == 0).sum())
    print(f"{name:24s} {w.numel():8d} {float((w == 0).float().mean()):9.4f}")
print(f"{'overall':24s} {total:8d} {zeros / total:9.4f}  ({total / max(1, total - zeros):.1f}x)")

calib = DataLoader(TensorDataset(data.x_train[:512], data.y_train[:512]), batch_size=128)
q = de_plugin_inc.quantize(model, "static", calib_dataloader=calib)
print(f"test accuracy: dense {dense_test:.4f} -> pruned {pruned_test:.4f} -> int8 {test(q.model):.4f}")
