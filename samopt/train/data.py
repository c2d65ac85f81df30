"""Data sets on disk in their standard formats, read into memory or streamed from files.

- Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747): the IDX files of its
  distribution (``train-images-idx3-ubyte.gz`` etc.); Debian's
  ``dataset-fashion-mnist`` package puts them in :data:`FASHION_MNIST_DIR`.
- CIFAR-10 / CIFAR-100 (Krizhevsky 2009): the "python version" pickle batches
  (``cifar-10-batches-py/data_batch_1`` ... ``test_batch``; ``cifar-100-python/train``,
  ``test``), found in the given directory or in those subdirectories.
- ImageNet: the ImageFolder layout (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``),
  streamed by :class:`samopt.train.loader.FolderLoader`; Pillow is imported only then.
- ``synthetic``: random images of a given shape, for smoke runs.

:func:`load` returns an :class:`ImageData` by name; :func:`download` fetches the
public files of Fashion-MNIST and CIFAR.

Example::

    x, y = fashion_mnist("train")            # uint8 (60000, 28, 28), int64 (60000,)
    data = load("cifar10", "~/data/cifar")   # ImageData, images uint8 (n, 3, 32, 32)
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "ImageData",
    "cifar",
    "download",
    "fashion_mnist",
    "image_folder",
    "load",
    "read_idx",
    "synthetic",
]

#: Where Debian's ``dataset-fashion-mnist`` installs the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLITS = {"train": "train", "test": "t10k"}
#: Names :func:`load` accepts.
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")
#: Public download locations (the data sets' own distribution points).
URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
# Channel statistics on the 0-1 scale: Fashion-MNIST's training set; CIFAR's as in the Sparse SAM code.
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class ImageData:
    """A classification data set: uint8 images ``(n, C, H, W)`` and int64 labels, or a folder for ImageNet.

    ``mean`` and ``std`` are per-channel on the 0-1 scale; ``root`` is set (and the
    tensors are ``None``) for data streamed from files.
    """

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    x_train: Tensor | None = None
    y_train: Tensor | None = None
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    root: Path | None = None

    @property
    def in_channels(self) -> int:
        return len(self.mean)


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
            "(apt-get install dataset-fashion-mnist), point --data-dir (root=) at a directory holding the IDX "
            "files, or pass --download to fetch them"
        )
    images, labels = read_idx(files[0]), read_idx(files[1]).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
    return images, labels


def cifar(name: str, split: str, root: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Images (uint8, ``(n, 3, 32, 32)``) and labels of CIFAR-10 or CIFAR-100 from the python pickle batches."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of 'train', 'test'; got {split!r}")
    sub, train_files, test_files, key, classes = _CIFAR[name]
    root = Path(root).expanduser()
    folder = root / sub if (root / sub).is_dir() else root
    files = [folder / f for f in (train_files if split == "train" else test_files)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"{name} files not found: {missing}. Put the 'python version' of {name} "
            f"({URLS[name]}, extracted) in --data-dir, or pass --download to fetch it"
        )
    images, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        if b"data" not in batch or key not in batch:
            raise ValueError(f"{f} is not a {name} batch: it has no {b'data'!r} / {key!r} entries")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[key], dtype=np.int64))
    x, y = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    if len(x) != len(y):
        raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels in the {split} split")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        found = f"{int(y.min())}..{int(y.max())}"
        raise ValueError(f"{folder}: labels must lie in [0, {classes}) for {name}, found {found}")
    return x, y


def synthetic(
    n_train: int = 50_000,
    n_test: int = 10_000,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> ImageData:
    """Random uint8 images and labels of CIFAR's shape and size (or as given), for smoke runs and timings.

    Nothing can be learned from them; accuracy stays at chance.
    """
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[Tensor, Tensor]:
        return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.randint(
            0, num_classes, (n,), generator=g
        )

    (x, y), (xt, yt) = make(n_train), make(n_test)
    c = shape[0]
    return ImageData("synthetic", num_classes, (0.5,) * c, (0.29,) * c, x, y, xt, yt)


_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")


def image_folder(root: str | os.PathLike, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and class names of ``root/split/<class>/<image>`` (classes sorted by name)."""
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet split folder not found: {folder}. --data-dir must hold train/ and val/, each with one "
            "subfolder of images per class (the ImageFolder layout)"
        )
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                files.append(f)
                labels.append(i)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {folder}/<class>/")
    return files, labels, classes


def load(
    name: str, data_dir: str | os.PathLike | None = None, download_missing: bool = False, synthetic_size: int = 50_000
) -> ImageData:
    """The data set ``name`` (one of :data:`DATASETS`) from ``data_dir`` (Fashion-MNIST: Debian's by default).

    ``synthetic_size`` is the number of training images of ``"synthetic"`` (a fifth as many test images).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "synthetic":
        return synthetic(synthetic_size, max(1, synthetic_size // 5))
    if data_dir is None and name != "fashion-mnist":
        raise ValueError(f"dataset {name!r} needs --data-dir (the directory holding its files)")
    root = Path(data_dir).expanduser() if data_dir is not None else FASHION_MNIST_DIR
    mean, std = _STATS[name]
    if name == "imagenet":
        _, _, classes = image_folder(root, "train")
        return ImageData(name, len(classes), mean, std, root=root)
    read = fashion_mnist if name == "fashion-mnist" else (lambda split, r: cifar(name, split, r))
    try:
        x, y = read("train", root)
    except FileNotFoundError:
        if not download_missing:
            raise
        download(name, root)
        x, y = read("train", root)
    xt, yt = read("test", root)
    if name == "fashion-mnist":
        x, xt = x.unsqueeze(1), xt.unsqueeze(1)
    classes = 100 if name == "cifar100" else 10
    return ImageData(name, classes, mean, std, x, y, xt, yt)


def download(name: str, root: str | os.PathLike, base_url: str | None = None) -> Path:
    """Fetch Fashion-MNIST's four IDX files or a CIFAR archive (extracted) into ``root``; returns ``root``.

    Each file is written to a temporary name and renamed when complete, so an
    interrupted download leaves nothing half-written. ``base_url`` overrides
    :data:`URLS` (a mirror).
    """
    if name not in URLS:
        raise ValueError(f"cannot download {name!r}; downloadable: {', '.join(URLS)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    url = base_url or URLS[name]
    if name == "fashion-mnist":
        for prefix in _SPLITS.values():
            for kind in ("images-idx3", "labels-idx1"):
                fname = f"{prefix}-{kind}-ubyte.gz"
                _fetch(url.rstrip("/") + "/" + fname, root / fname)
        return root
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        _fetch(url, archive)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python before 3.11.4: refuse what the data filter would
                unsafe = [m.name for m in tar if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym()]
                if unsafe:
                    raise ValueError(f"{url}: the archive has unsafe member(s) {unsafe[:3]}")
                tar.extractall(tmp)
        sub = _CIFAR[name][0]
        if not (Path(tmp) / sub).is_dir():
            raise ValueError(f"{url} does not hold {sub}/: not the python version of {name}")
        shutil.rmtree(root / sub, ignore_errors=True)
        os.replace(Path(tmp) / sub, root / sub)
    return root


def _fetch(url: str, dest: Path) -> None:
    print(f"downloading {url} -> {dest}", flush=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not download {url}: {e}. Fetch the file by hand into {dest.parent}") from e
    os.replace(tmp, dest)
