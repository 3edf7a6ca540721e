"""INC 3.8+ (``pip install 'de-plugin[inc]'``): de_layerwise, then INC 3.x static int8 (PT2E), on LeNet-5 or
ResNet-20 / Fashion-MNIST. Prints per-layer sparsity, test accuracy dense / pruned / int8, whether every
pruned weight is the zero point of its int8 integer, and the bytes on disk (dense fp32, INC's own saved
model, ours as sparse int8).

    python examples/inc/prune_and_quantize_inc3.py                    # LeNet-5, 90% (about 1 minute)
    python examples/inc/prune_and_quantize_inc3.py --model resnet20   # ResNet-20, 80%, stage groups (about 2.5 minutes)
    python examples/inc/prune_and_quantize_inc3.py --pattern 4x1 --exclude conv2 fc2   # blocks need rows in 4s
"""
import argparse
import json
import os
import sys
import tempfile

import torch

import de_plugin_inc  # first: registers DELayerwiseConfig with INC 3.x and quiets INC's import-time chatter
from neural_compressor.torch.quantization import StaticQuantConfig  # noqa: E402
from de_plugin.demo.data import load_idx_dataset
from de_plugin.demo.models import create_model
from de_plugin.demo.training import make_evaluate, make_finetune, train
from de_plugin_inc import DELayerwiseConfig

ap = argparse.ArgumentParser()
ap.add_argument("--model", choices=["lenet5", "resnet20"], default="lenet5")
ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
ap.add_argument("--sparsity", type=float, default=None, help="default: 0.9 (LeNet-5), 0.8 (ResNet-20)")
ap.add_argument("--pattern", default="1x1", help="1x1, 4x1 or 2:4 (INC's layouts)")
ap.add_argument("--exclude", nargs="*", default=[], help="layers left dense (regexes), e.g. those a pattern does not divide")
ap.add_argument("--epochs", type=int, default=3, help="dense training epochs (fine-tuning after pruning: 1)")
ap.add_argument("--train-limit", type=int, default=None)
ap.add_argument("--json", default=None, help="also write the results to this JSON file (benchmarks/results/inc3/)")
args = ap.parse_args()
lenet = args.model == "lenet5"
sparsity = args.sparsity or (0.9 if lenet else 0.8)

torch.manual_seed(0)
data = load_idx_dataset(args.data, train_limit=args.train_limit or (20000 if lenet else 4000), val_size=1000,
                        test_limit=2000, size=28 if lenet else 32)
model = create_model("lenet5") if lenet else create_model("resnet20", in_channels=1)
model = train(model, data.x_train, data.y_train, epochs=args.epochs, seed=0, progress=True).eval()
val = make_evaluate(data.x_val[:500], data.y_val[:500])  # the search's fitness (validation split)
test = make_evaluate(data.x_test, data.y_test)
finetune = make_finetune(data.x_train, data.y_train, lr=5e-4)

de = {"population": 12, "generations": 6} if lenet else {"generations": 4, "groups": "stage"}
pruning = DELayerwiseConfig(target_sparsity=sparsity, pattern=args.pattern, eval_fn=val, de_options=de,
                            excluded_op_names=tuple(f"{x}$" for x in args.exclude),
                            finetune_fn=lambda m: finetune(m, 1))
calib = [data.x_train[i : i + 128] for i in range(0, 512, 128)]
q = de_plugin_inc.prune_and_quantize(model, pruning, StaticQuantConfig(), example_inputs=(data.x_val[:8],),
                                     calib_data=calib)
masks, report = q.de_plugin_masks, q.de_plugin_report

print(f"{'layer':22s} {'params':>8s} {'sparsity':>9s} {'zeros kept in int8':>19s}")
for name, keep in masks.items():
    print(f"{name:22s} {keep.numel():8d} {report['layers'][name]:9.4f} "
          f"{report['zeros_kept'].get(name, float('nan')):19.4f}")
print(f"overall sparsity {report['sparsity']:.4f} ({args.pattern}); layers checked in the int8 graph: "
      f"{len(report['zeros_kept'])}/{len(masks)}")


def accuracy(m):
    with torch.no_grad():
        return float((m(data.x_test).argmax(1) == data.y_test).float().mean())


ev = report["eval"]
print(f"validation accuracy: dense {ev['dense']:.4f} -> pruned {ev['pruned']:.4f} -> int8 {ev['quantized']:.4f}")
print(f"test accuracy: dense {test(model):.4f} -> pruned int8 {accuracy(q):.4f}")

with tempfile.TemporaryDirectory() as tmp:
    torch.save(model.state_dict(), os.path.join(tmp, "dense.pt"))
    q.save(example_inputs=(data.x_val[:8],), output_dir=os.path.join(tmp, "inc"))  # INC's own format
    inc_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(tmp, "inc")) for f in fs)
    ours = de_plugin_inc.save(q, os.path.join(tmp, "model.dpq"))
    back = de_plugin_inc.load(os.path.join(tmp, "model.dpq"))
    with torch.no_grad():
        same = torch.equal(back(data.x_test[:256]), q(data.x_test[:256]))
    dense = os.path.getsize(os.path.join(tmp, "dense.pt"))
# int8 alone stores each value in a quarter of fp32's bytes; the rest of the ratio is the sparse format
print(f"bytes on disk: dense fp32 {dense:,} | INC's saved int8 model {inc_bytes:,} | ours, sparse int8 {ours:,} "
      f"({dense / ours:.1f}x smaller than dense: 4x from int8 values, {dense / 4 / ours:.2f}x from storing only the "
      f"non-zeros and a bitmask); reloaded outputs equal: {same}")
if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"model": args.model, "pattern": args.pattern, "sparsity": report["sparsity"],
                   "layers": report["layers"], "zeros_kept": report["zeros_kept"], "val": ev,
                   "test": {"dense": test(model), "pruned_int8": accuracy(q)},
                   "bytes": {"dense_fp32": dense, "inc_saved_int8": inc_bytes, "ours_sparse_int8": ours},
                   "reloaded_equal": same, "command": sys.argv}, f, indent=1)
