"""LeNet-5 / Fashion-MNIST: de_layerwise inside Intel Neural Compressor's pruning loop, then INC
static int8 quantization. Prints per-layer sparsity and accuracy before/after pruning and after
quantization.

    python examples/inc/lenet5_inc.py                 # about 2 minutes on 2 CPU cores (measured 128 s)
    python examples/inc/lenet5_inc.py --epochs 1 --train-limit 5000   # a quick look
"""
import argparse

import torch
import torch.nn.functional as F
from neural_compressor.training import WeightPruningConfig, prepare_compression
from torch.utils.data import DataLoader, TensorDataset

import de_plugin_inc  # registers pruning_type="de_layerwise" with INC
from de_plugin.demo.data import load_idx_dataset
from de_plugin.demo.models import LeNet5
from de_plugin.demo.training import make_evaluate, train

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
ap.add_argument("--sparsity", type=float, default=0.9)
ap.add_argument("--epochs", type=int, default=4, help="dense training epochs (fine-tuning uses 2)")
ap.add_argument("--train-limit", type=int, default=None)
args = ap.parse_args()

torch.manual_seed(0)
data = load_idx_dataset(args.data, train_limit=args.train_limit)
model = train(LeNet5(), data.x_train, data.y_train, epochs=args.epochs, seed=0, progress=True)
val = make_evaluate(data.x_val[:2000], data.y_val[:2000])  # the search's fitness (validation split)
test = make_evaluate(data.x_test, data.y_test)
dense_test = test(model)

steps_per_epoch = -(-len(data.y_train) // 128)  # prune during the first epoch, fine-tune in the second
config = WeightPruningConfig(
    [{"op_names": ["conv.*", "fc.*"], "pruning_type": "de_layerwise", "eval_func": val,
      "de_options": {"population": 12, "generations": 8}}],
    target_sparsity=args.sparsity, pattern="1x1", start_step=0, end_step=steps_per_epoch,
    pruning_frequency=max(1, steps_per_epoch // 4),
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

print(f"{'layer':8s} {'params':>8s} {'sparsity':>9s}")
total = zeros = 0
for name in ("conv1", "conv2", "fc1", "fc2"):
    w = model.get_submodule(name).weight
    total, zeros = total + w.numel(), zeros + int((w == 0).sum())
    print(f"{name:8s} {w.numel():8d} {float((w == 0).float().mean()):9.4f}")
print(f"overall  {total:8d} {zeros / total:9.4f}  ({total / max(1, total - zeros):.1f}x)")

calib = DataLoader(TensorDataset(data.x_train[:512], data.y_train[:512]), batch_size=128)
q = de_plugin_inc.quantize(model, "static", calib_dataloader=calib)
ints = de_plugin_inc.int8_weights(q)
kept_zero = all(bool(torch.all(ints[n][model.get_submodule(n).weight == 0] == 0)) for n in ints if n in ("conv1", "conv2", "fc1"))
print(f"test accuracy: dense {dense_test:.4f} -> pruned {pruned_test:.4f} -> int8 {test(q.model):.4f}")
print(f"pruned weights are integer zeros after quantization: {kept_zero}")
