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
from samopt.train.config import TrainConfig, flag
from samopt.train.loader import FolderLoader, TensorLoader, fixed_subset
from samopt.train.models import MODELS, build
from samopt.train.optimizers import Amp, spec
from samopt.train.task import Loader, Task

__all__ = ["build_task", "evaluate", "memorisation", "validate"]


def validate(cfg: TrainConfig) -> None:
    """Check the image settings that no library call checks, without reading any data."""
    validation.choice("dataset", cfg.dataset, datasets.DATASETS)
    validation.choice("model", cfg.model, MODELS)
    for name in ("image_size", "synthetic_size"):
        validation.positive_int(name, getattr(cfg, name))
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0: decode in the main process), got {cfg.workers!r}")
    validation.positive_int("train_subset", cfg.train_subset, allow_none=True)
    validation.positive_int("test_subset", cfg.test_subset, allow_none=True)
    if cfg.cutout < 0 or (cfg.crop_padding is not None and cfg.crop_padding < 0):
        raise ValueError(f"cutout and crop_padding must be >= 0, got {cfg.cutout} and {cfg.crop_padding}")
    if cfg.dataset == "imagenet":
        unused = [flag(k) for k in ("train_subset", "test_subset", "crop_padding") if getattr(cfg, k) is not None]
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
    validation.unit_interval("label_noise", cfg.label_noise, include_one=False)
    validation.choice("label_noise_mode", cfg.label_noise_mode, datasets.NOISE_MODES)
    if isinstance(cfg.label_noise_seed, bool) or not isinstance(cfg.label_noise_seed, int):
        raise TypeError(f"label_noise_seed must be an int, got {cfg.label_noise_seed!r}")
    if cfg.label_noise and cfg.dataset == "imagenet":
        raise ValueError(
            "--label-noise applies to the data sets held in memory (fashion-mnist, cifar10, cifar100, synthetic), "
            "not to imagenet's folders"
        )


class _Loaders:
    """The train and test batch streams of a run, SSAM-F's Fisher stream (``None`` for other optimizers) and,
    with label noise, the training examples whose labels were changed (``None`` without)."""

    def __init__(self, cfg: TrainConfig, data: datasets.ImageData, device: torch.device) -> None:
        common: dict[str, Any] = {"mean": data.mean, "std": data.std, "device": device}
        fisher = spec(cfg.optimizer).fisher
        self.train: Loader
        self.test: Loader
        self.fisher: Loader | None = None
        self.flipped: tuple[TensorLoader, Tensor] | None = None  # their images with noisy labels, their true labels
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
        if cfg.label_noise:
            noisy = datasets.noisy_labels(
                y, cfg.label_noise, data.num_classes, mode=cfg.label_noise_mode, seed=cfg.label_noise_seed
            )
            flipped = noisy != y
            if bool(flipped.any()):  # a rate too small to change one label changes none
                self.flipped = (
                    TensorLoader(x[flipped], noisy[flipped], cfg.batch_size, train=False, **common),
                    y[flipped].to(device),
                )
            y = noisy
        x, y = x.to(device), y.to(device)  # one copy on the device, shared by the train and Fisher streams
        aug: dict[str, Any] = {
            "crop_padding": pad,
            "flip": image if cfg.flip is None else cfg.flip,
            "cutout": cfg.cutout,
        }
        self.train = TensorLoader(x, y, cfg.batch_size, train=True, seed=cfg.seed, **aug, **common)
        xt, yt = cast(Tensor, data.x_test), cast(Tensor, data.y_test)
        keep = fixed_subset(len(xt), cfg.test_subset, "test images", "test_subset")
        if keep is not None:
            xt, yt = xt[keep], yt[keep]
        # evaluated in training-sized batches: on a CPU, batches of 1000 took twice as long (docs/benchmarks.md)
        self.test = TensorLoader(xt, yt, cfg.batch_size, train=False, **common)
        if fisher:
            self.fisher = TensorLoader(x, y, cfg.batch_size, train=True, seed=cfg.seed + 1, **aug, **common)


@torch.no_grad()
def _predict(model: nn.Module, loader: Loader, amp: Amp, prepare: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The predicted classes over ``loader`` in eval mode, its labels, and the summed cross-entropy (float64)."""
    was = model.training
    model.eval()
    loss, preds, labels = torch.zeros((), dtype=torch.float64), [], []
    for x, y in loader.epoch(0):
        with amp.autocast():
            logits = model(prepare(x))
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double().cpu()
        preds.append(logits.argmax(1))
        labels.append(y)
    model.train(was)
    return torch.cat(preds), torch.cat(labels), loss


def evaluate(model: nn.Module, loader: Loader, amp: Amp, prepare: Any = lambda x: x) -> dict[str, float]:
    """Mean cross-entropy (``test_loss``) and accuracy (``test_acc``) over ``loader`` in eval mode."""
    preds, labels, loss = _predict(model, loader, amp, prepare)
    return {"test_loss": float(loss) / len(labels), "test_acc": float((preds == labels).double().mean())}


def memorisation(
    model: nn.Module, loader: Loader, true: Tensor, amp: Amp, prepare: Any = lambda x: x
) -> dict[str, float]:
    """On the training examples whose labels the noise changed (``loader`` yields them with their noisy labels,
    ``true`` holds their true ones), in eval mode and without augmentation: the fraction predicted as their noisy
    label (``flipped_acc_noisy``, how much of the noise the model has memorised) and as their true label
    (``flipped_acc_true``)."""
    preds, noisy, _ = _predict(model, loader, amp, prepare)
    return {
        "flipped_acc_noisy": float((preds == noisy).double().mean()),
        "flipped_acc_true": float((preds == true).double().mean()),
    }


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

    def evaluate_all(m: nn.Module, amp: Amp) -> dict[str, float]:
        metrics = evaluate(m, loaders.test, amp, prepare)
        if loaders.flipped is not None:
            metrics.update(memorisation(m, loaders.flipped[0], loaders.flipped[1], amp, prepare))
        return metrics

    return Task(
        model=model,
        train=loaders.train,
        fisher=loaders.fisher,
        loss_fn=loss_fn,
        evaluate=evaluate_all,
        score="test_acc",
        prepare=prepare,
    )
