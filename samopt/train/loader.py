"""Batches for training and evaluation, reproducible from ``(seed, epoch, batch)`` alone.

- :class:`TensorLoader`: a data set held in memory as uint8 images (Fashion-MNIST,
  CIFAR, synthetic) is moved to the device once, and each batch is shuffled,
  augmented and normalised there: random crop with zero padding, horizontal flip and
  Cutout (DeVries and Taylor 2017, arXiv:1708.04552), so a GPU is not starved by a
  CPU pipeline.
- :class:`FolderLoader`: ImageNet-style folders decoded by Pillow in worker
  processes: random-resized crop and flip for training, resize and centre crop for
  evaluation (the Sparse SAM code's torchvision pipeline), normalised on the device.

The order of an epoch and every random choice of a batch are functions of the seed,
the epoch and the batch index, so ``loader.epoch(e, start=k)`` continues an
interrupted epoch exactly, whatever happened before.

Example::

    loader = TensorLoader(x, y, 128, mean=(0.5,), std=(0.25,), train=True, crop_padding=4, flip=True, seed=0)
    for x, y in loader.epoch(0):
        ...
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from samopt.train.data import image_folder

__all__ = ["CUTOUT_P", "FolderLoader", "TensorLoader", "batch_seed", "fixed_subset"]


#: The probability that an image gets its Cutout square, as in the Sparse SAM code's transforms.
CUTOUT_P = 0.5


def batch_seed(*keys: int) -> int:
    """A 63-bit seed derived from integers such as ``(seed, epoch, batch)``, the same on every run and machine."""
    digest = hashlib.blake2b("/".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def fixed_subset(n: int, size: int | None, what: str, name: str = "train_subset") -> Tensor | None:
    """Indices of ``size`` of ``n`` examples, the same for every run and seed (a seed-0 shuffle); ``None`` for all.

    ``what`` names the examples and ``name`` the setting in the error for a ``size`` above ``n``.
    """
    if size is None:
        return None
    if size > n:
        raise ValueError(f"{name} must be at most the {n} {what}, got {size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size]


def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(batch_seed(seed, epoch, -1)))


class _Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) / self.std


class TensorLoader:
    """Shuffled, augmented batches of an in-memory uint8 image tensor, computed on ``device``.

    ``train=False`` gives the batches in order, unaugmented, the last one possibly
    short. With ``train=True`` the order is reshuffled each epoch, the last partial
    batch is dropped (``drop_last`` as in the Sparse SAM code) and each image gets,
    in this order: a random crop after zero-padding by ``crop_padding`` pixels, a
    horizontal flip with probability 0.5 (``flip``), normalisation, and with
    probability :data:`CUTOUT_P` a ``cutout`` x ``cutout`` square set to 0 (the mean).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        crop_padding: int = 0,
        flip: bool = False,
        cutout: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be uint8 images of shape (n, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} images, {len(y)} labels")
        if batch_size < 1 or (train and batch_size > len(x)):
            raise ValueError(f"batch_size must be between 1 and the number of images {len(x)}, got {batch_size}")
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.crop_padding, self.flip, self.cutout = crop_padding, flip, cutout
        self.normalize = _Normalize(mean, std, self.device)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches ``start, start + 1, ...`` of ``epoch``."""
        n, bs = len(self.x), self.batch_size
        order = _permutation(n, self.seed, epoch).to(self.device) if self.train else None
        for b in range(start, len(self)):
            idx = slice(b * bs, min(n, (b + 1) * bs)) if order is None else order[b * bs : (b + 1) * bs]
            x, y = self.x[idx], self.y[idx]
            if not self.train:
                yield self.normalize(x), y
                continue
            g = torch.Generator(device=self.device).manual_seed(batch_seed(self.seed, epoch, b))
            yield self._augment(x, g), y

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        dev = self.device
        x = x.float()
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            i = torch.randint(0, 2 * p + 1, (n,), generator=g, device=dev)
            j = torch.randint(0, 2 * p + 1, (n,), generator=g, device=dev)
            rows = (i[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (j[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            image = torch.arange(n, device=dev)[:, None, None, None]
            x = padded[image, torch.arange(c, device=dev)[None, :, None, None], rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=g, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = self.normalize(x)
        if self.cutout:
            apply = torch.rand(n, generator=g, device=dev) < CUTOUT_P
            cy = torch.randint(0, h, (n,), generator=g, device=dev)[:, None]
            cx = torch.randint(0, w, (n,), generator=g, device=dev)[:, None]
            half = self.cutout // 2
            ys, xs = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
            in_rows = (ys >= cy - half) & (ys < cy - half + self.cutout)
            in_cols = (xs >= cx - half) & (xs < cx - half + self.cutout)
            hole = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
            x = x.masked_fill(hole[:, None], 0.0)
        return x


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], labels: list[int], size: int, train: bool, flip: bool, seed: int) -> None:
        self.files, self.labels, self.size, self.train, self.flip, self.seed = files, labels, size, train, flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as file:
            im = file.convert("RGB")
            if self.train:
                rnd = random.Random(batch_seed(self.seed, self.epoch, i))
                im = _random_resized_crop(im, self.size, rnd)
                if rnd.random() < 0.5 and self.flip:
                    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                im = _resize_center_crop(im, self.size)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return data.view(self.size, self.size, 3).permute(2, 0, 1).contiguous(), self.labels[i]


def _random_resized_crop(im, size: int, rnd: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop of random area (``scale``) and aspect ratio (``ratio``, log-uniform) resized to ``size``; 10 tries."""
    from PIL import Image

    w, h = im.size
    for _ in range(10):
        area = w * h * rnd.uniform(*scale)
        aspect = math.exp(rnd.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rnd.randint(0, w - cw), rnd.randint(0, h - ch)
            return im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    return _resize_center_crop(im, size, resize=size)  # fall back to the whole (centre-cropped) image


def _resize_center_crop(im, size: int, resize: int | None = None):
    """Resize the shorter side to ``resize`` (256/224 of ``size`` by default), then crop the centre ``size`` square."""
    from PIL import Image

    resize = resize or round(size * 256 / 224)
    w, h = im.size
    s = resize / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


class FolderLoader:
    """Batches of ``root/split/<class>/<image>`` decoded by ``workers`` processes; see the module docstring.

    ``train=True``: reshuffled each epoch, last partial batch dropped, random-resized crop
    to ``image_size`` and (``flip``) a horizontal flip with probability 0.5.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        image_size: int = 224,
        flip: bool = True,
        workers: int = 4,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        try:
            import PIL  # noqa: F401
        except ImportError as e:
            raise ImportError("reading image folders needs Pillow: pip install 'samopt[app]'") from e
        files, labels, _ = image_folder(root, split)
        if batch_size < 1 or (train and batch_size > len(files)):
            raise ValueError(
                f"batch_size must be between 1 and the {len(files)} images of {Path(root) / split}, got {batch_size}"
            )
        self.data = _FolderDataset(files, labels, image_size, train, flip, seed)
        self.batch_size, self.train, self.seed, self.workers = batch_size, train, seed, workers
        self.device = torch.device(device)
        self.normalize = _Normalize(mean, std, self.device)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches ``start, start + 1, ...`` of ``epoch``."""
        n, bs = len(self.data), self.batch_size
        order = _permutation(n, self.seed, epoch).tolist() if self.train else list(range(n))
        order = order[start * bs : len(self) * bs]
        self.data.epoch = epoch
        loader = torch.utils.data.DataLoader(
            self.data,
            batch_size=bs,
            sampler=order,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
