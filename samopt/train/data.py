"""Data sets on disk in their standard formats.

Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) in the IDX format of its
distribution (``train-images-idx3-ubyte.gz`` etc.); Debian's
``dataset-fashion-mnist`` package puts it in :data:`FASHION_MNIST_DIR`.

Example::

    x, y = fashion_mnist("train")     # uint8 (60000, 28, 28), int64 (60000,)
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["FASHION_MNIST_DIR", "fashion_mnist", "read_idx"]

#: Where Debian's ``dataset-fashion-mnist`` installs the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an IDX file (optionally gzipped) into a tensor of its stored shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {body.size} values")
    return torch.from_numpy(body.astype(dtype.newbyteorder("="), copy=True).reshape(shape))


def fashion_mnist(split: str, root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[Tensor, Tensor]:
    """Images (uint8, ``(n, 28, 28)``) and labels (int64) of the ``"train"`` or ``"test"`` split."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of 'train', 'test'; got {split!r}")
    root = Path(root)
    prefix = _SPLITS[split]
    files = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or pass root= to a directory holding the IDX files"
        )
    images, labels = read_idx(files[0]), read_idx(files[1]).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
    return images, labels
