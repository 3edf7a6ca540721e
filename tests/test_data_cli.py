"""IDX loading (real Fashion-MNIST from the Debian package, and a hand-written IDX folder) and
the command line's main job on a small real subset."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from de_plugin import cli
from de_plugin.demo import training as demo_training
from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset, read_idx


def write_idx(path, arr, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_folder(tmp_path, n_train=600, n_test=200, gz=True):
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.kron(d.images, np.ones((3, 3)))  # 24x24
    img = np.pad(img, ((0, 0), (2, 2), (2, 2))) * 15.9  # 28x28, 0..255
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", img[:n_train], gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", d.target[:n_train], gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", img[n_train : n_train + n_test], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", d.target[n_train : n_train + n_test], gz)
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_splits_are_disjoint(tmp_path, gz):
    folder = make_folder(tmp_path, gz=gz)
    s = load_idx_dataset(folder, val_size=100)
    assert s.sizes() == {"train": 500, "val": 100, "test": 200}
    assert s.x_train.shape[1:] == (1, 28, 28)
    rows = lambda x: {hash(r.numpy().tobytes()) for r in x.flatten(1)}  # noqa: E731
    assert not (rows(s.x_val) & rows(s.x_train)) or len(rows(s.x_val) & rows(s.x_train)) < 5  # duplicates in digits only


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(trunc)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_idx_dataset(tmp_path / "missing")


def test_fashion_mnist_from_debian_package():
    s = load_idx_dataset(FASHION_MNIST_DIR, val_size=5000)
    assert s.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert set(torch.unique(s.y_test).tolist()) == set(range(10))


def test_main_job_on_real_fashion_mnist_subset(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_training, "CACHE", tmp_path / "cache")
    out = tmp_path / "run"
    rc = cli.main(["run", "--train-epochs", "2", "--val-size", "1000", "--train-limit", "6000", "--sparsity", "0.9", "--out", str(out),
                   "--options", '{"rounds": 2, "finetune_epochs": 1, "population": 8, "generations": 3}'])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fc1.weight" in text and "compression" in text and "CSR" in text and "test accuracy" in text
    res = json.loads((out / "result.json").read_text())
    assert abs(res["sparsity"] - 0.9) < 1e-4 and res["nfev"] > 0
    assert res["storage"]["pruned_layers_bytes"]["best_sparse"] < res["storage"]["pruned_layers_bytes"]["dense"]
    assert (out / "report.png").stat().st_size > 1000 and (out / "pruned.pt").exists()
    assert list((tmp_path / "cache").glob("lenet300_*.pt"))  # dense model cached outside the repo
    cap = res["options"]["finalist_steps"]  # the main job's finalists: a tenth of a round's fine-tune
    n = load_idx_dataset(FASHION_MNIST_DIR, val_size=1000, train_limit=6000).sizes()["train"]
    assert cap == round(0.1 * 1 * -(-n // 128))  # finetune_epochs=1, batches of 128
    de = res["history"][0]["de"]
    assert de["finalist_steps_total"] == cap * de["finalists_retrained"] and "finalist_epochs_total" not in de


def test_cli_reports_bad_input(tmp_path, capsys):
    rc = cli.main(["run", "--pruner", "de_layerwize", "--data", str(tmp_path)])
    assert rc == 2
    assert "unknown pruner 'de_layerwize'" in capsys.readouterr().err
    rc = cli.main(["run", "--options", '{"populaton": 3}', "--data", str(tmp_path)])
    assert rc == 2 and "did you mean 'population'" in capsys.readouterr().err
    rc = cli.main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert rc == 2 and "dataset-fashion-mnist" in capsys.readouterr().err
    rc = cli.main(["list"])
    assert rc == 0 and "de_layerwise" in capsys.readouterr().out


def test_dense_reference_is_the_same_whatever_the_process_drew_before(tmp_path, monkeypatch):
    """Same seed, same weights: the initialisation is seeded too, not only the training."""
    data = load_idx_dataset(FASHION_MNIST_DIR, val_size=100, train_limit=512, seed=0)
    weights = []
    for i, draw in enumerate((0, 1000)):
        monkeypatch.setattr(demo_training, "CACHE", tmp_path / f"cache{i}")  # train, do not load
        torch.rand(draw)  # other work in the process before the reference is trained
        weights.append(demo_training.dense_model("lenet300", data, epochs=1, seed=3,
                                                 data_dir=str(FASHION_MNIST_DIR)).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
