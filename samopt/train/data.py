"""Data sets on disk in their standard formats, read into memory or streamed from files.

- Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747): the IDX files of its
  distribution (``train-images-idx3-ubyte.gz`` etc.); Debian's
  ``dataset-fashion-mnist`` package puts them in :data:`FASHION_MNIST_DIR`.
- CIFAR-10 / CIFAR-100 (Krizhevsky 2009): the "python version" pickle batches
  (``cifar-10-batches-py/data_batch_1`` ... ``test_batch``; ``cifar-100-python/train``,
  ``test``), found in the given directory or in those subdirectories. They are read
  by a restricted unpickler (:func:`read_cifar_batch`) that builds nothing but
  dicts, lists, strings, integers and integer numpy arrays, so a crafted file cannot
  run code.
- ImageNet: the ImageFolder layout (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``),
  streamed by :class:`samopt.train.loader.FolderLoader`; Pillow is imported only then.
- ``synthetic``: random images of a given shape, for smoke runs.

:func:`load` returns an :class:`ImageData` by name, with every label and image shape
checked before any training; :func:`download` fetches the public files of
Fashion-MNIST and CIFAR and checks each against its published SHA-256 sum.

Example::

    x, y = fashion_mnist("train")            # uint8 (60000, 28, 28), int64 (60000,)
    data = load("cifar10", "~/data/cifar")   # ImageData, images uint8 (n, 3, 32, 32)
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samopt import validation

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "NOISE_MODES",
    "ImageData",
    "cifar",
    "download",
    "fashion_mnist",
    "fetch",
    "image_folder",
    "load",
    "noisy_labels",
    "read_cifar_batch",
    "read_idx",
    "synthetic",
]

#: Where Debian's ``dataset-fashion-mnist`` installs the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLITS = {"train": "train", "test": "t10k"}
#: Names :func:`load` accepts.
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")
#: Public download locations (the data sets' own distribution points).
URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
#: SHA-256 of each downloaded file, by file name: the sums that Keras and torchvision's
#: dataset code check for the CIFAR archives, and the sums of the Fashion-MNIST files as
#: distributed (their MD5s are the ones the Fashion-MNIST README publishes).
SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
        "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
        "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
        "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
    },
    "cifar10": {"cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
    "cifar100": {"cifar-100-python.tar.gz": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"},
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


#: The kinds of label noise :func:`noisy_labels` makes.
NOISE_MODES = ("symmetric", "pairflip")


def noisy_labels(labels: Tensor, rate: float, num_classes: int, *, mode: str = "symmetric", seed: int = 0) -> Tensor:
    """``labels`` with exactly ``round(rate * n)`` of them changed, as the noisy-label literature corrupts them.

    ``"symmetric"``: each chosen label becomes a uniformly drawn *other* class (the
    noise of Foret et al.'s Table 4, ICLR 2021, arXiv:2010.01412). ``"pairflip"``: class
    ``c`` becomes ``c + 1 mod C``, the asymmetric class-pair noise of Han et al.,
    "Co-teaching", NeurIPS 2018, arXiv:1804.06872. Which labels change, and into what,
    is a pure function of ``(labels, rate, mode, seed)``: the same for every optimizer,
    run seed, rank and resume.

    Example::

        noisy = noisy_labels(y, 0.4, 10, seed=0)    # 40% of y replaced by another class
        flipped = noisy != y
    """
    validation.unit_interval("label_noise", rate, include_one=False)
    validation.choice("label_noise_mode", mode, NOISE_MODES)
    n, k = len(labels), round(rate * len(labels))
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[:k]
    if mode == "symmetric":
        shift = torch.randint(1, num_classes, (k,), generator=g)
    else:
        shift = torch.ones(k, dtype=torch.int64)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift.to(labels.device)) % num_classes
    return noisy


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
    """Read an IDX file (optionally gzipped) into a tensor of its stored shape and type.

    A file that is not IDX, is truncated (in its gzip stream, its header or its
    body) or holds more values than its header says raises ``ValueError`` naming it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); fetch it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(
            f"{path} is truncated: its header needs {offset} bytes for {ndim} dimensions, the file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    size, rest = divmod(len(data) - offset, dtype.itemsize)
    if rest or size != math.prod(shape):
        raise ValueError(
            f"{path}: header says shape {shape} but the file holds {size} values"
            + (f" and {rest} stray byte(s)" if rest else "")
        )
    body = np.frombuffer(data, dtype=dtype, offset=offset)
    return torch.from_numpy(body.astype(dtype.newbyteorder("="), copy=True).reshape(shape))


def _check_labels(labels: Tensor | np.ndarray, classes: int, source: object) -> None:
    """Raise unless ``labels`` are integers in ``[0, classes)``; ``source`` (a file or folder) is named."""
    kind = labels.dtype.kind if isinstance(labels, np.ndarray) else ("f" if labels.is_floating_point() else "i")
    if kind not in "iu":
        raise ValueError(f"{source}: labels must be integers, found {labels.dtype} values")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"{source}: labels must lie in [0, {classes}), found {int(labels.min())}..{int(labels.max())}")


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
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(
            f"{files[0]}: Fashion-MNIST images must be uint8 of shape (n, height, width), "
            f"found {images.dtype} of shape {tuple(images.shape)}"
        )
    if labels.dim() != 1:
        raise ValueError(f"{files[1]}: labels must be one per image (shape (n,)), found shape {tuple(labels.shape)}")
    _check_labels(labels, 10, files[1])
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
    return images, labels.long()


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
        batch = read_cifar_batch(f)
        if b"data" not in batch or key not in batch:
            raise ValueError(f"{f} is not a {name} batch: it has no {b'data'!r} / {key!r} entries")
        data, y = batch[b"data"], np.asarray(batch[key])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{f}: {name} images must be uint8 of shape (n, 3072), found {found}")
        if y.shape != (len(data),):
            raise ValueError(f"{f}: {len(data)} images but labels of shape {y.shape}")
        _check_labels(y, classes, f)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y.astype(np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# What a CIFAR batch may be built from: the numpy array constructors of every numpy
# version's pickles, checked by the wrappers below, and _codecs.encode for bytes that
# Python 3 wrote with protocol 2. Nothing else is ever looked up or called.
_INT_DTYPES = frozenset(["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "b1"])


class _Refused(pickle.UnpicklingError):
    """What a CIFAR batch may not hold."""


class _Ndarray:
    """Stands for ``numpy.ndarray`` in a pickle: only :func:`_reconstruct` accepts it; it cannot be called."""


def _dtype(code: Any, align: Any = False, copy: Any = False) -> np.dtype:
    name = code.decode("latin1") if isinstance(code, bytes) else code  # Python 2 pickles (CIFAR's) give bytes
    if not isinstance(name, str) or name.lstrip("<>|=") not in _INT_DTYPES:
        raise _Refused(f"numpy dtype {code!r}: only integer and bool arrays are allowed")
    return np.dtype(name)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    if cls is not _Ndarray or shape != (0,):
        raise _Refused("an ndarray subclass or a non-empty initial array")
    return np.empty(0, np.uint8)  # numpy's pickles then set the data, shape and dtype with __setstate__


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(buffer, (bytes, bytearray)):
        raise _Refused("an array that is not raw integer data")
    return np.frombuffer(buffer, dtype).reshape(shape, order=order).copy()


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode other than of a string to latin1 bytes")
    return text.encode("latin1")


_PICKLE_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy", "ndarray"): _Ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"it refers to {module}.{name}")
        return found


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is made of dicts, lists, bytes, str, numbers and integer arrays only."""
    if depth > 3:
        return False
    if isinstance(value, np.ndarray):
        return type(value) is np.ndarray and not value.dtype.hasobject and value.dtype.kind in "iub"
    if isinstance(value, dict):
        return all(isinstance(k, (bytes, str)) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    return type(value) in (bytes, str, int, float, bool) or value is None


def read_cifar_batch(path: str | os.PathLike) -> dict[Any, Any]:
    """One batch file of CIFAR's python version (a pickle), read without running any code.

    The unpickler admits only what the format holds: dicts, lists, strings, bytes,
    integers and numpy arrays of integer types. Anything else (a call to another
    function, an object of another class, an object array) is refused with a
    ``ValueError`` that names the file, before anything is built from it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise ValueError(
            f"{path} was refused: it is not a plain CIFAR batch ({e}); samopt reads CIFAR files with a restricted "
            "unpickler that builds only dicts, lists, strings, integers and integer arrays. Replace the file with "
            "the official one (--download checks its SHA-256)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError, struct.error) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); fetch it again") from None
    if not isinstance(batch, dict) or not _plain(batch):
        raise ValueError(f"{path} is not a CIFAR batch: it does not hold a dict of arrays, lists and strings")
    return batch


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
        _, _, class_names = image_folder(root, "train")
        return ImageData(name, len(class_names), mean, std, root=root)
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
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(
            f"{root}: the training images are {tuple(x.shape[1:])} (channels, height, width) but the test images "
            f"are {tuple(xt.shape[1:])}; both splits must come from one data set"
        )
    if len(x) == 0 or len(xt) == 0:
        raise ValueError(f"{root}: the {'training' if len(x) == 0 else 'test'} split of {name} holds no images")
    classes = 100 if name == "cifar100" else 10
    return ImageData(name, classes, mean, std, x, y, xt, yt)


def download(
    name: str, root: str | os.PathLike, base_url: str | None = None, sha256: dict[str, str] | None = None
) -> Path:
    """Fetch Fashion-MNIST's four IDX files or a CIFAR archive (extracted) into ``root``; returns ``root``.

    Each file is written to a temporary name, checked against its SHA-256 sum and
    only then renamed, so an interrupted or altered download leaves nothing behind:
    a file whose sum differs is deleted and a ``ValueError`` says so. ``base_url``
    overrides :data:`URLS` (a mirror); ``sha256`` overrides the published sums of
    :data:`SHA256` (file name to hex digest), for a mirror of other files.
    """
    if name not in URLS:
        raise ValueError(f"cannot download {name!r}; downloadable: {', '.join(URLS)}")
    sums = SHA256[name] if sha256 is None else sha256
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    url = base_url or URLS[name]
    if name == "fashion-mnist":
        for prefix in _SPLITS.values():
            for kind in ("images-idx3", "labels-idx1"):
                fname = f"{prefix}-{kind}-ubyte.gz"
                fetch(url.rstrip("/") + "/" + fname, root / fname, sums[fname])
        return root
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        sub, published = _CIFAR[name][0], Path(URLS[name]).name
        by_hand = f"Fetch {published} by hand and extract it into {root} (it holds {sub}/)"
        fetch(url, archive, sums[published], by_hand)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python before 3.11.4: refuse what the data filter would
                unsafe = [m.name for m in tar if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym()]
                if unsafe:
                    raise ValueError(f"{url}: the archive has unsafe member(s) {unsafe[:3]}")
                tar.extractall(tmp)
        if not (Path(tmp) / sub).is_dir():
            raise ValueError(f"{url} does not hold {sub}/: not the python version of {name}")
        shutil.rmtree(root / sub, ignore_errors=True)
        os.replace(Path(tmp) / sub, root / sub)
    return root


def fetch(url: str, dest: Path, sha256: str, by_hand: str | None = None) -> None:
    """Download ``url`` to ``dest`` if its SHA-256 is ``sha256``; else delete what came and raise ``ValueError``.

    The bytes go to a temporary name beside ``dest`` and are renamed only once checked, so an interrupted or
    altered download leaves nothing behind. If the server cannot be reached, ``OSError`` names the URL and
    ``by_hand``, how to get the file without samopt (default: fetch it into ``dest``'s folder).
    """
    print(f"downloading {url} -> {dest}", flush=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = by_hand or f"Fetch the file by hand into {dest.parent}"
        raise OSError(f"could not download {url}: {e}. {hint}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha256.lower():
        tmp.unlink()
        raise ValueError(
            f"the download of {url} has SHA-256 {digest.hexdigest()}, not the published {sha256}: it is not the "
            "file it claims to be (a broken or altered download) and was deleted. Try again later or from "
            "another network"
        )
    os.replace(tmp, dest)
