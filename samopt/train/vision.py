"""Image classification for ``samopt train``: data set, loaders, model, loss and evaluation as a :class:`Task`.

Example::

    task = build_task(resolve("fmnist-demo", {}), torch.device("cpu"))
    task.evaluate(task.model, Amp("none", torch.device("cpu")))   # {"test_loss": ..., "test_acc": ...}
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samopt import validation
from samopt.train import data as datasets
from samopt.train.config import TrainConfig
from samopt.train.loader import FolderLoader, TensorLoader, fixed_subset
from samopt.train.models import MODELS, build
from samopt.train.optimizers import Amp, spec
from samopt.train.task import Loader, Task

__all__ = ["build_task", "evaluate", "validate"]


def validate(cfg: TrainConfig) -> None:
    """Check the image settings that no library call checks, without reading any data."""
    validation.choice("dataset", cfg.dataset, datasets.DATASETS)
    validation.choice("model", cfg.model, MODELS)
    for name in ("image_size", "synthetic_size"):
        validation.positive_int(name, getattr(cfg, name))
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0: decode in the main process), got {cfg.workers!r}")
    validation.positive_int("train_subset", cfg.train_subset, allow_none=True)
    if cfg.cutout < 0 or (cfg.crop_padding is not None and cfg.crop_padding < 0):
        raise ValueError(f"cutout and crop_padding must be >= 0, got {cfg.cutout} and {cfg.crop_padding}")
    if cfg.dataset == "imagenet":
        unused = [f"--{k.replace('_', '-')}" for k in ("train_subset", "crop_padding") if getattr(cfg, k) is not None]
        unused += ["--cutout"] if cfg.cutout else []
        if unused:
            raise ValueError(
                f"{', '.join(unused)} do(es) not apply to imagenet, whose training crops are random-resized crops "
                "of --image-size; leave them out"
            )
    if cfg.model == "small-cnn" and cfg.dataset != "fashion-mnist":
        raise ValueError(f"model 'small-cnn' is for 28x28 images (fashion-mnist); for {cfg.dataset} use resnet-small")
    if cfg.download and cfg.data_dir is None:
        raise ValueError("--download needs --data-dir: the directory to download the files into")


class _Loaders:
    """The train and test batch streams of a run, and SSAM-F's Fisher stream (``None`` for other optimizers)."""

    def __init__(self, cfg: TrainConfig, data: datasets.ImageData, device: torch.device) -> None:
        common: dict[str, Any] = {"mean": data.mean, "std": data.std, "device": device}
        fisher = spec(cfg.optimizer).fisher
        self.train: Loader
        self.test: Loader
        self.fisher: Loader | None = None
        if data.root is not None:  # image folders
            folder: dict[str, Any] = {"image_size": cfg.image_size, "workers": cfg.workers, **common}
            train: dict[str, Any] = {"train": True, "flip": cfg.flip is not False, **folder}
            self.train = FolderLoader(data.root, "train", cfg.batch_size, seed=cfg.seed, **train)
            self.test = FolderLoader(data.root, "val", cfg.batch_size, train=False, **folder)
            if fisher:
                self.fisher = FolderLoader(data.root, "train", cfg.batch_size, seed=cfg.seed + 1, **train)
            return
        x, y = cast(Tensor, data.x_train), cast(Tensor, data.y_train)  # in memory, as the data set has no root
        keep = fixed_subset(len(x), cfg.train_subset, "training images")
        if keep is not None:
            x, y = x[keep], y[keep]
        image = data.name in ("cifar10", "cifar100", "fashion-mnist")
        pad = cfg.crop_padding if cfg.crop_padding is not None else {"fashion-mnist": 2}.get(data.name, 4 * image)
        side = min(x.shape[-2:])
        for name, value in (("crop_padding", pad), ("cutout", cfg.cutout)):
            if value > side:
                raise ValueError(
                    f"{name} must be between 0 and {side} (the side of the {data.name} images), got {value}"
                )
        x, y = x.to(device), y.to(device)  # one copy on the device, shared by the train and Fisher streams
        aug: dict[str, Any] = {
            "crop_padding": pad,
            "flip": image if cfg.flip is None else cfg.flip,
            "cutout": cfg.cutout,
        }
        self.train = TensorLoader(x, y, cfg.batch_size, train=True, seed=cfg.seed, **aug, **common)
        self.test = TensorLoader(cast(Tensor, data.x_test), cast(Tensor, data.y_test), 1000, train=False, **common)
        if fisher:
            self.fisher = TensorLoader(x, y, cfg.batch_size, train=True, seed=cfg.seed + 1, **aug, **common)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, amp: Amp, prepare=lambda x: x) -> dict[str, float]:
    """Mean cross-entropy (``test_loss``) and accuracy (``test_acc``) over ``loader`` in eval mode."""
    was = model.training
    model.eval()
    loss, correct, n = torch.zeros((), dtype=torch.float64), 0, 0
    for x, y in loader.epoch(0):
        with amp.autocast():
            logits = model(prepare(x))
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double().cpu()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was)
    return {"test_loss": float(loss) / n, "test_acc": correct / n}


@torch.no_grad()
def _check_fits(model: nn.Module, x: Tensor, cfg: TrainConfig, where: object) -> None:
    """Raise a ``ValueError`` if ``model`` cannot take images shaped like ``x`` (an eval-mode forward, nothing kept)."""
    was = model.training
    model.eval()
    try:
        model(x)
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"the images of {cfg.dataset} in {where} are {tuple(x.shape[1:])} (channels, height, width), which "
            f"model {cfg.model} cannot take ({reason}); choose a model for this image size"
        ) from None
    finally:
        model.train(was)


def build_task(cfg: TrainConfig, device: torch.device) -> Task:
    """The data set, loaders and model of ``cfg`` on ``device`` (the model initialised from ``cfg.seed``).

    Before returning it checks that the model takes the data set's image size (one
    evaluation-mode forward of two blank images, which changes no weight, buffer or RNG).
    """
    data = datasets.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.synthetic_size)
    loaders = _Loaders(cfg, data, device)
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, data.num_classes, data.in_channels).to(device)

    def prepare(x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    shape = (cfg.image_size,) * 2 if data.x_test is None else tuple(data.x_test.shape[-2:])
    where = data.root or cfg.data_dir or (datasets.FASHION_MNIST_DIR if cfg.dataset == "fashion-mnist" else "memory")
    _check_fits(model, prepare(torch.zeros(2, data.in_channels, *shape, device=device)), cfg, where)

    def loss_fn(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(logits.float(), y, reduction=reduction, label_smoothing=cfg.label_smoothing)

    return Task(
        model=model,
        train=loaders.train,
        fisher=loaders.fisher,
        loss_fn=loss_fn,
        evaluate=lambda m, amp: evaluate(m, loaders.test, amp, prepare),
        score="test_acc",
        prepare=prepare,
    )
