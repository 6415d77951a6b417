"""Real labelled images for accuracy checks: Fashion-MNIST (Debian's ``dataset-fashion-mnist``).

The files are the original idx format, gzip-compressed (``train-images-idx3-ubyte.gz`` …).
Images are 28x28 grey; models here take them zero-padded to 32x32 (what a patch-4/8 or
stride-32 network needs), normalized with the training set's mean and std, as 1 channel
or replicated to 3.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import UserError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # of the 60k training images, pixels in [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_dir() -> Path:
    """``$FASHION_MNIST_DIR`` or Debian's location; UserError saying how to install it."""
    root = Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))
    if not (root / _FILES["test"][0]).is_file():
        raise UserError(f"Fashion-MNIST not found in {root}: `apt-get install dataset-fashion-mnist` "
                        "(Debian), or set FASHION_MNIST_DIR to a folder with the idx .gz files")
    return root


def _idx(path: Path) -> np.ndarray:
    """An idx file (magic: 0, 0, dtype 0x08 = uint8, ndim; then big-endian int32 dims)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path}: not a uint8 idx file")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", ndim, 4).astype(int)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "test", *, channels: int = 1, size: int = 32, limit: int | None = None,
                       root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """(images (N, channels, size, size) float32 normalized, labels (N,) int64) of ``split``.

    ``size`` >= 28: the 28x28 image is zero-padded (centred) to it; ``channels`` 1 or 3
    (3 replicates the grey channel); ``limit`` keeps the first N images.
    """
    if split not in _FILES:
        raise UserError(f"split {split!r}: choose train or test")
    if channels not in (1, 3) or size < 28:
        raise UserError(f"Fashion-MNIST gives 1 or 3 channels at size >= 28 (asked {channels} x {size})")
    base = Path(root) if root is not None else fashion_mnist_dir()
    images, labels = (_idx(base / name) for name in _FILES[split])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    lo = (size - 28) // 2
    # zero in pixel space (the background) is -MEAN/STD after normalization
    padded = torch.full((len(x), size, size), -MEAN / STD, dtype=torch.float32)
    padded[:, lo:lo + 28, lo:lo + 28] = x
    return padded[:, None].expand(-1, channels, -1, -1).contiguous(), torch.from_numpy(labels.astype(np.int64))
