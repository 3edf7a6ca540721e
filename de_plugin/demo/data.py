"""Datasets from local files only (nothing is downloaded): IDX (MNIST format) and sklearn digits.

Splits are kept apart: ``train`` (for training and fine-tuning), ``val`` (a held-out part of the
training file, used by the search) and ``test`` (only reported).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Splits:
    """Tensors for each split; images are float (N, C, H, W), labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} elements, header says {shape})")
    return arr.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for cand in (folder / stem, folder / (stem + ".gz"), folder / stem.replace("-idx", ".idx")):
        if cand.exists():
            return cand
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {folder}. For Fashion-MNIST run "
        "`apt-get install -y dataset-fashion-mnist`, or pass the folder holding MNIST-format IDX files."
    )


def load_idx_dataset(
    folder: str | os.PathLike = FASHION_MNIST_DIR,
    val_size: int = 5000,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    size: int | None = None,
) -> Splits:
    """MNIST-format dataset (MNIST, Fashion-MNIST, KMNIST...) from a folder of IDX files.

    The validation split is ``val_size`` images drawn (seeded) from the training file. ``size=32``
    zero-pads the 28x28 images to 32x32 (after normalisation, so the border is the mean) for the
    CIFAR-style deep models.
    """
    folder = Path(folder)
    xs = {k: read_idx(_find(folder, v)) for k, v in _FILES.items()}
    x_tr = torch.from_numpy(xs["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
    y_tr = torch.from_numpy(xs["train_labels"].astype(np.int64))
    x_te = torch.from_numpy(xs["test_images"].astype(np.float32) / 255.0).unsqueeze(1)
    y_te = torch.from_numpy(xs["test_labels"].astype(np.int64))
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if size is not None:
        x_tr, x_te = _pad_to(x_tr, size), _pad_to(x_te, size)
    return _split(x_tr, y_tr, x_te, y_te, val_size, train_limit, test_limit, seed)


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if size < max(h, w):
        raise ValueError(f"size={size} is smaller than the images ({h}x{w}); give size >= {max(h, w)}")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))


def load_cifar10(
    folder: str | os.PathLike,
    val_size: int = 5000,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> Splits:
    """CIFAR-10 from a folder holding the python pickle batches (``data_batch_1`` .. ``data_batch_5``
    and ``test_batch``, as in ``cifar-10-python.tar.gz`` once extracted). Nothing is downloaded:
    fetch and extract the archive yourself and pass the ``cifar-10-batches-py`` folder."""
    import pickle

    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: pass the extracted `cifar-10-batches-py` folder of "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (nothing is downloaded at run time)")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [read(n) for n in names[:5]]
    x_tr = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0)
    y_tr = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    x_te, y_te = read("test_batch")
    x_te, y_te = torch.from_numpy(x_te.astype(np.float32) / 255.0), torch.from_numpy(y_te)
    mean, std = x_tr.mean((0, 2, 3), keepdim=True), x_tr.std((0, 2, 3), keepdim=True)
    return _split((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, val_size, train_limit, test_limit, seed)


def load_digits_dataset(val_size: int = 300, test_size: int = 300, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images): tiny and fast, for tests."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    x = (x - x.mean()) / x.std()
    return _split(x[test_size:], y[test_size:], x[:test_size], y[:test_size], val_size, None, None, seed)


def _split(x_tr, y_tr, x_te, y_te, val_size, train_limit, test_limit, seed) -> Splits:
    if not 0 < val_size < len(y_tr):
        raise ValueError(f"val_size must be between 1 and {len(y_tr) - 1}, got {val_size}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y_tr), generator=g)
    val_idx, tr_idx = perm[:val_size], perm[val_size:]
    if train_limit is not None:
        tr_idx = tr_idx[:train_limit]
    if test_limit is not None:
        x_te, y_te = x_te[:test_limit], y_te[:test_limit]
    return Splits(x_tr[tr_idx], y_tr[tr_idx], x_tr[val_idx], y_tr[val_idx], x_te, y_te)
