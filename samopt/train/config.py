"""Settings of one training run, and the recipes (named presets) that fill them in.

A run's settings are resolved in three layers: the defaults of :class:`TrainConfig`
(the Sparse SAM code's argument defaults, ``../research/ssam.md`` section 7.1), then
the recipe's values, then whatever the user set explicitly. :data:`RECIPES` holds the
papers' settings (Sparse SAM README commands, section 7.2 of the brief) and the CPU
demo.

Example::

    cfg = resolve("cifar10-resnet18-ssam-f", {"epochs": 10})
    cfg.rho, cfg.sparsity, cfg.epochs     # 0.1, 0.5, 10
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe", "TrainConfig", "resolve"]


@dataclass
class TrainConfig:
    """Every setting of ``samopt train``; each field is also a command-line flag (``--field-name``)."""

    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None  # the first n images of a fixed shuffle of the training set
    crop_padding: int | None = None  # None: 4 on CIFAR, 2 on Fashion-MNIST, 0 otherwise
    flip: bool | None = None  # None: on for CIFAR, Fashion-MNIST and ImageNet
    cutout: int = 0  # side of the Cutout square (16 in the Sparse SAM CIFAR runs); applied with p=0.5
    image_size: int = 224  # ImageNet crops
    workers: int = 4  # ImageNet decoding processes
    # model and loss
    model: str = "resnet-small"
    label_smoothing: float = 0.0
    # optimizer
    optimizer: str = "sgd"
    base: str = "sgd"  # base optimizer of the SAM family: any torch.optim class name
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    max_grad_norm: float | None = None
    rho: float | None = None  # None: 0.05 (0.5 for asam)
    eta: float = 0.01  # ASAM's eta
    bn: str = "first"
    sparsity: float = 0.5
    granularity: str = "element"
    mask_interval: int = 1  # epochs between mask updates (T_m)
    num_samples: int = 16  # SSAM-F Fisher samples (N_s)
    fisher_labels: str = "true"
    drop_rate: float = 0.5  # SSAM-D
    drop: str = "gradient"
    grow: str = "random"
    estimator: str = "probe"  # delta-sam
    alpha: float = -1.0
    num_probes: int = 3
    delta_clip: float | None = 5.0
    # schedule
    epochs: int = 200
    batch_size: int = 128
    schedule: str = "cosine"  # cosine | multistep | constant
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    # machine
    device: str = "auto"  # auto: cuda when available
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    seed: int = 0
    out: str | None = None  # None: runs/<dataset>-<model>-<optimizer>-s<seed>
    resume: bool = False
    progress: bool = True

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Recipe:
    """A named preset: a description, where its numbers come from, and the settings it fixes."""

    description: str
    source: str
    settings: dict[str, Any]


_CIFAR = {"batch_size": 128, "lr": 0.05, "momentum": 0.9, "schedule": "cosine", "epochs": 200, "cutout": 16}
_SPARSE = {"sparsity": 0.5, "num_samples": 16, "mask_interval": 1}

#: The presets of ``--recipe``; ``samopt recipes`` prints them.
RECIPES: dict[str, Recipe] = {
    "fmnist-demo": Recipe(
        "CPU demo: Fashion-MNIST, small ResNet, 3 epochs on a 12k-image subset (about 1-2 min per SAM run on 2 cores)",
        "samopt; chosen to fit `make demo` in 15 minutes on 2 CPU cores",
        {
            "dataset": "fashion-mnist",
            "model": "resnet-small",
            "epochs": 3,
            "batch_size": 128,
            "train_subset": 12_000,
            "lr": 0.05,
            "weight_decay": 5e-4,
            "rho": 0.05,
            "estimator": "logit",
            **_SPARSE,
        },
    ),
    "cifar10-resnet18-sgd": Recipe(
        "SGD baseline, ResNet-18, CIFAR-10 with Cutout",
        "Sparse SAM README (ssam.md 7.2): lr 0.05, wd 5e-4",
        {**_CIFAR, "dataset": "cifar10", "model": "resnet18", "optimizer": "sgd", "weight_decay": 5e-4},
    ),
    "cifar10-resnet18-sam": Recipe(
        "SAM, ResNet-18, CIFAR-10 with Cutout",
        "Sparse SAM README (ssam.md 7.2): rho 0.1, wd 1e-3 as its SSAM-F run",
        {**_CIFAR, "dataset": "cifar10", "model": "resnet18", "optimizer": "sam", "rho": 0.1, "weight_decay": 1e-3},
    ),
    "cifar10-resnet18-ssam-f": Recipe(
        "SSAM-F, ResNet-18, CIFAR-10 with Cutout, 50% sparsity",
        "Sparse SAM README (ssam.md 7.2): rho 0.1, wd 1e-3, s 0.5, N_s 16, T_m 1",
        {
            **_CIFAR,
            **_SPARSE,
            "dataset": "cifar10",
            "model": "resnet18",
            "optimizer": "ssam-f",
            "rho": 0.1,
            "weight_decay": 1e-3,
        },
    ),
    "cifar10-resnet18-ssam-d": Recipe(
        "SSAM-D, ResNet-18, CIFAR-10 with Cutout, 50% sparsity",
        "no SSAM-D command is given; the SSAM-F settings and the code's SSAM-D defaults (ssam.md 7.1-7.2)",
        {
            **_CIFAR,
            **_SPARSE,
            "dataset": "cifar10",
            "model": "resnet18",
            "optimizer": "ssam-d",
            "rho": 0.1,
            "weight_decay": 1e-3,
            "drop_rate": 0.5,
            "drop": "gradient",
            "grow": "random",
        },
    ),
    "cifar100-wrn28-10-sam": Recipe(
        "SAM, WRN-28-10, CIFAR-100 with Cutout",
        "Sparse SAM README (ssam.md 7.2): rho 0.2, wd 1e-3",
        {**_CIFAR, "dataset": "cifar100", "model": "wrn28-10", "optimizer": "sam", "rho": 0.2, "weight_decay": 1e-3},
    ),
    "cifar100-wrn28-10-ssam-f": Recipe(
        "SSAM-F, WRN-28-10, CIFAR-100 with Cutout, 50% sparsity",
        "Sparse SAM README (ssam.md 7.2): the SAM WRN settings with the SSAM-F mask settings",
        {
            **_CIFAR,
            **_SPARSE,
            "dataset": "cifar100",
            "model": "wrn28-10",
            "optimizer": "ssam-f",
            "rho": 0.2,
            "weight_decay": 1e-3,
        },
    ),
    "imagenet-resnet50-ssam-f": Recipe(
        "SSAM-F, ResNet-50, ImageNet, 90 epochs",
        "Sparse SAM README (ssam.md 7.2): bs 256, rho 0.7, wd 1e-4, s 0.5, N_s 128, T_m 1; lr 0.05 (not given there)",
        {
            "dataset": "imagenet",
            "model": "resnet50",
            "optimizer": "ssam-f",
            "epochs": 90,
            "batch_size": 256,
            "lr": 0.05,
            "rho": 0.7,
            "weight_decay": 1e-4,
            "sparsity": 0.5,
            "num_samples": 128,
            "mask_interval": 1,
            "schedule": "cosine",
        },
    ),
}


def resolve(recipe: str | None, explicit: dict[str, Any]) -> TrainConfig:
    """Defaults, then ``recipe``'s settings, then the ``explicit`` ones (field name -> value)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(explicit) - fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; settings are the fields of TrainConfig")
    settings: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)} (see `samopt recipes`)")
        settings.update(RECIPES[recipe].settings)
    settings.update(explicit)
    return TrainConfig(**settings)
