"""Settings of one training run, and the recipes (named presets) that fill them in.

A run's settings are resolved in three layers: the defaults of :class:`TrainConfig`
(the argument defaults of the official Sparse SAM code, Mi et al., NeurIPS 2022), then
the recipe's values (common ones, then those for the chosen optimizer), then whatever
the user set explicitly. :data:`RECIPES` holds the papers' settings (the commands of
the Sparse SAM README) per data set and model, and the CPU demo, so that
``samopt compare --recipe cifar10-resnet18 --optimizers sgd,sam,ssam-f`` gives each
optimizer its paper settings.

Example::

    cfg = resolve("cifar10-resnet18", {"optimizer": "ssam-f", "epochs": 10})
    cfg.rho, cfg.sparsity, cfg.epochs     # 0.1, 0.5, 10
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

from samopt.train.optimizers import OPTIMIZERS, SAM_FAMILY, run_rho

__all__ = [
    "DATASET_DEFAULTS",
    "RECIPES",
    "RESUMABLE_CHANGES",
    "GlueConfig",
    "Recipe",
    "RunConfig",
    "TrainConfig",
    "config_differences",
    "flag",
    "resolve",
    "saved_config",
    "task_kind",
    "to_flags",
]


@dataclass
class RunConfig:
    """The settings every run shares: optimizer, schedule, machine, outputs. Each field is a flag (``--field-name``)."""

    label_smoothing: float = 0.0
    # optimizer
    optimizer: str = "sgd"
    base: str = "sgd"  # base optimizer of the SAM family: any torch.optim class name
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    max_grad_norm: float | None = None
    rho: float | None = None  # None: the optimizer's (samopt optimizers): 0.05, 0.5 for asam; on GLUE 0.005 and 0.05
    adaptive: bool = False  # the SAM family: ASAM's element-wise scaling of e (asam: always)
    eta: float = 0.01  # ASAM's eta
    bn: str = "first"
    sync: str = "global"  # under torchrun: perturb with the all-reduced gradient (global) or each rank's (local)
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
    # which SAM steps ascend (samopt.schedules); the others cost one forward/backward
    ascend: str = "always"  # always | every | random | adaptive | late
    ascend_every: int = 1  # every: k, the period
    ascend_prob: float = 1.0  # random: the probability (at the start)
    ascend_prob_end: float | None = None  # random: the probability at the end, along a half cosine (None: constant)
    ascend_from: float = 0.0  # late: the fraction of training before SAM starts
    ae_lambda1: float = -1.0  # adaptive (AE-SAM): the threshold's coefficient at the start ...
    ae_lambda2: float = 1.0  # ... and at the end
    ae_decay: float = 0.9  # adaptive: the moving averages' decay
    look_alpha: float = 0.7  # looksam: the weight of the reused direction
    gsam_alpha: float = 0.2  # gsam: the weight of the clean gradient's orthogonal part
    rho_min: float | None = None  # gsam: rho at the end of the lr schedule (None: constant rho)
    fsam_sigma: float = 1.0  # friendly-sam: the weight of the EMA subtracted from g
    fsam_lambda: float = 0.9  # friendly-sam: the EMA's factor
    vasso_theta: float = 0.9  # vasso: the EMA's weight on the new gradient
    wsam_gamma: float = 0.9  # wsam: the sharpness weight, alpha = gamma / (1 - gamma)
    wsam_coupled: bool = False  # wsam: the sharpness term in the gradient instead of a step of its own
    ascent_sub_batches: int = 1  # m: the clean pass (the ascent's gradient) on the first 1/m of each batch
    # schedule
    epochs: int = 200
    batch_size: int = 128
    schedule: str = "cosine"  # cosine | linear | multistep | constant
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    # machine and outputs
    device: str = "auto"  # auto: cuda when available
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 0
    deterministic: bool = False  # cuDNN deterministic algorithms (bit-exact GPU resume; slower)
    out: str | None = None
    resume: bool = False
    progress: bool = True

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def default_out(self) -> str:
        raise NotImplementedError


@dataclass
class TrainConfig(RunConfig):
    """Every setting of ``samopt train`` (image classification)."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None  # the first n images of a fixed shuffle of the training set
    test_subset: int | None = None  # evaluate on the first n images of a fixed shuffle of the test set (None: all)
    synthetic_size: int = 50_000  # training images of the synthetic data set (CIFAR's size); a fifth as many test
    crop_padding: int | None = None  # None: 4 on CIFAR, 2 on Fashion-MNIST, 0 otherwise
    flip: bool | None = None  # None: on for CIFAR, Fashion-MNIST and ImageNet
    cutout: int = 0  # side of the Cutout square (16 in the Sparse SAM CIFAR runs); applied with p=0.5
    image_size: int = 224  # ImageNet crops
    workers: int = 4  # ImageNet decoding processes
    model: str = "resnet-small"
    channels_last: bool = False
    label_noise: float = 0.0  # fraction of the training labels replaced (the test set stays clean)
    label_noise_mode: str = "symmetric"  # symmetric (another class, uniformly) or pairflip (class c to c + 1)
    label_noise_seed: int = 0  # which labels, and into what: the same for every optimizer and run seed

    def default_out(self) -> str:
        return f"runs/{self.dataset}-{self.model}-{self.optimizer}-s{self.seed}"


@dataclass
class GlueConfig(RunConfig):
    """Every setting of ``samopt glue``: the usual GLUE fine-tuning recipe (BERT, Devlin et al. 2019) by default.

    AdamW, lr 2e-5, batch 32, 3 epochs, linear decay after a warmup of 10% of the steps,
    weight decay 0.01, sequences cut at 128 tokens (Devlin et al., NAACL 2019, appendix A.3).
    """

    task: str = "mrpc"
    data_dir: str | None = None  # the task's folder: train.tsv and dev.tsv
    download: bool = False  # fetch the task's files into data_dir if missing
    model: str = "all-MiniLM-L6-v2"  # the packaged model, or any local or hub path
    max_length: int = 128
    train_subset: int | None = None  # the first n examples of a fixed shuffle of train.tsv
    optimizer: str = "adamw"
    base: str = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 32
    schedule: str = "linear"
    warmup_epochs: float = 0.3  # 10% of 3 epochs

    def default_out(self) -> str:
        return f"runs/glue-{self.task}-{self.optimizer}-s{self.seed}"


@dataclass(frozen=True)
class Recipe:
    """A named preset: a description, where its numbers come from, the settings it fixes for every optimizer,
    and the settings that depend on the optimizer (``per_optimizer[name]``, applied after ``settings``)."""

    description: str
    source: str
    settings: dict[str, Any]
    per_optimizer: dict[str, dict[str, Any]] = field(default_factory=dict)


#: Label noise on Fashion-MNIST (measured here; docs/benchmarks.md, "Label noise"): SAM's robustness to noisy
#: labels, the setting of Foret et al., ICLR 2021, Table 4 (CIFAR-10), at a CPU's scale.
_NOISY = {
    "dataset": "fashion-mnist",
    "model": "small-cnn",
    "train_subset": 5000,
    "label_noise": 0.4,
    "epochs": 40,
    "batch_size": 128,
    "lr": 0.02,
    "warmup_epochs": 1.0,
    "schedule": "cosine",
    "weight_decay": 5e-4,
    "crop_padding": 0,
    "flip": False,
    "estimator": "logit",
    "sparsity": 0.5,
    "num_samples": 16,
    "mask_interval": 1,
}
_NOISY_SOURCE = (
    "samopt, measured (docs/benchmarks.md, 'Label noise'): 40% symmetric noise as in Foret et al., ICLR 2021, "
    "Table 4; rho 0.1 for the SAM family but ASAM and SAM-ON, which keep their own (0.05 fitted a fifth of the "
    "noise), and MSAM, 1 (measured: 3 diverges, 0.3 memorises); lr 0.02 with a 1-epoch warmup; "
    "no augmentation"
)
#: Optimizers whose rho lives on another scale than SAM's (ASAM's is relative to |w|, SAM-ON's and MSAM's larger):
#: a recipe's SAM rho is not theirs, so they keep their own defaults (samopt optimizers).
OWN_RHO = ("asam", "sam-on", "msam")
#: The optimizers that take a recipe's SAM rho.
SAM_RHO = tuple(o for o in SAM_FAMILY if o not in OWN_RHO)
_CIFAR = {"batch_size": 128, "lr": 0.05, "momentum": 0.9, "schedule": "cosine", "epochs": 200, "cutout": 16}
_SPARSE = {"sparsity": 0.5, "num_samples": 16, "mask_interval": 1}
_SOURCE = (
    "Sparse SAM README commands (Mi et al., NeurIPS 2022): SGD wd 5e-4; SAM/SSAM wd 1e-3, rho 0.1 with ResNet-18 and "
    "0.2 with WRN-28-10, s 0.5, N_s 16, T_m 1; lr 0.05, batch 128, 200 epochs, cosine, crop+flip+Cutout 16"
)


def _cifar(dataset: str, model: str, rho: float) -> Recipe:
    sam = {"weight_decay": 1e-3, "rho": rho}
    inferred = {
        ("cifar10", "resnet18"): "",
        ("cifar100", "wrn28-10"): "",
    }.get((dataset, model), f"; [inferred] the README has no {dataset} {model} command: its {model} rho is used")
    return Recipe(
        f"{dataset.upper().replace('CIFAR', 'CIFAR-')} with Cutout, {model}: any optimizer (default ssam-f)",
        _SOURCE + inferred,
        {**_CIFAR, **_SPARSE, "dataset": dataset, "model": model, "optimizer": "ssam-f"},
        {
            "sgd": {"weight_decay": 5e-4},
            **{o: sam for o in SAM_RHO},
            **{o: {"weight_decay": 1e-3} for o in OWN_RHO},
        },
    )


def _variant(
    optimizer: str,
    description: str,
    source: str,
    settings: dict[str, Any],
    own: dict[str, Any],
    same_rho: tuple[str, ...] = SAM_RHO,
) -> Recipe:
    """A published variant's CIFAR run from its official code: ``settings`` for every optimizer compared on it,
    ``own`` for ``optimizer`` alone, and its rho for the optimizers ``same_rho``."""
    rho = {"rho": own["rho"]}
    per_optimizer = {o: rho for o in same_rho if o != optimizer}
    return Recipe(
        description,
        source,
        {"momentum": 0.9, "batch_size": 128, "epochs": 200, "schedule": "cosine", "optimizer": optimizer, **settings},
        {**per_optimizer, optimizer: own},
    )


#: The published variants' own CIFAR runs (their official code's example commands; the papers' hyperparameter
#: tables were not read): the settings a user reproducing one of them starts from.
_VARIANTS = {
    "cifar10-wrn16-8-gsam": _variant(
        "gsam",
        "CIFAR-10, WRN-16-8, adaptive GSAM at rho 2 (its official example)",
        "juntang-zhuang/GSAM example/train.py (Zhuang et al., ICLR 2022): SGD lr 0.1, batch 128, 200 epochs, "
        "wd 5e-4, cosine, label smoothing 0.1, crop+flip+Cutout 16; adaptive, rho_max = rho_min = 2 (constant), "
        "alpha 0.4; ASAM, its baseline, at the same rho",
        {
            "dataset": "cifar10",
            "model": "wrn16-8",
            "lr": 0.1,
            "weight_decay": 5e-4,
            "label_smoothing": 0.1,
            "cutout": 16,
        },
        {"rho": 2.0, "gsam_alpha": 0.4, "adaptive": True},
        same_rho=("asam",),
    ),
    "cifar100-resnet18-fsam": _variant(
        "friendly-sam",
        "CIFAR-100, ResNet-18, Friendly-SAM (its official run script)",
        "nblt/F-SAM run.sh (Li et al., CVPR 2024): SGD lr 0.05, batch 128, 200 epochs, wd 1e-3, cosine per "
        "iteration, crop+flip+Cutout 16; rho 0.2, sigma 1, lambda 0.95 (a logged run uses 0.6)",
        {"dataset": "cifar100", "model": "resnet18", "lr": 0.05, "weight_decay": 1e-3, "cutout": 16},
        {"rho": 0.2, "fsam_sigma": 1.0, "fsam_lambda": 0.95},
    ),
    "cifar100-wrn28-10-vasso": _variant(
        "vasso",
        "CIFAR-100, WRN-28-10, VaSSO (its official train.sh)",
        "BingcongLi/VaSSO train.sh (Li and Giannakis, NeurIPS 2023): SGD lr 0.1, batch 128, 200 epochs, wd 1e-3, "
        "crop+flip+Cutout 16; rho 0.2, theta 0.9; differs: the official cosine steps per epoch, samopt's per "
        "iteration",
        {"dataset": "cifar100", "model": "wrn28-10", "lr": 0.1, "weight_decay": 1e-3, "cutout": 16},
        {"rho": 0.2, "vasso_theta": 0.9},
    ),
    "cifar10-resnet18-wsam": _variant(
        "wsam",
        "CIFAR-10, ResNet-18, decoupled WSAM (its official example)",
        "dlrover atorch/examples/optimizer train_wsam_entry.sh (Yue et al., KDD 2023): SGD lr 0.1, batch 128, "
        "200 epochs, wd 5e-4, cosine per iteration, crop+flip, no Cutout; rho 0.2, gamma 0.9, decoupled; "
        "[inferred] no gradient clipping (one version of wsam.py clips at 1 by default, another does not)",
        {"dataset": "cifar10", "model": "resnet18", "lr": 0.1, "weight_decay": 5e-4, "cutout": 0},
        {"rho": 0.2, "wsam_gamma": 0.9, "wsam_coupled": False},
    ),
}
#: The label-noise recipes' rho: 0.1 for the SAM family; MSAM's measured 1 (docs/benchmarks.md, issue 17: 3, the
#: official README's, diverges here and 0.3 memorises the noise); ASAM and SAM-ON keep their own.
_NOISY_RHO: dict[str, dict[str, Any]] = {**{o: {"rho": 0.1} for o in SAM_RHO}, "msam": {"rho": 1.0}}
#: The presets of ``--recipe``; ``samopt recipes`` prints them.
RECIPES: dict[str, Recipe] = {
    "fmnist-demo": Recipe(
        "CPU demo: fmnist-noisy on 3k images for 30 epochs, evaluated on 2k test images (1.5 to 2.7 min per SAM "
        "run on 2 cores)",
        _NOISY_SOURCE + "; smaller, to fit `make demo` in 15 minutes on 2 CPU cores",
        {**_NOISY, "train_subset": 3000, "test_subset": 2000, "epochs": 30},
        _NOISY_RHO,
    ),
    "fmnist-noisy": Recipe(
        "Fashion-MNIST with 40% symmetric label noise, small CNN, 40 epochs on 5k images: where SAM's "
        "robustness to noise shows on a CPU (about 4 min per SAM run on 2 cores)",
        _NOISY_SOURCE,
        _NOISY,
        _NOISY_RHO,
    ),
    "cifar10-resnet18": _cifar("cifar10", "resnet18", 0.1),
    "cifar10-wrn28-10": _cifar("cifar10", "wrn28-10", 0.2),
    "cifar100-resnet18": _cifar("cifar100", "resnet18", 0.1),
    "cifar100-wrn28-10": _cifar("cifar100", "wrn28-10", 0.2),
    "imagenet-resnet50": Recipe(
        "ImageNet, ResNet-50, 90 epochs, batch 256 (SSAM-F by default)",
        "Sparse SAM README (Mi et al., NeurIPS 2022): bs 256, rho 0.7, wd 1e-4, s 0.5, N_s 128, T_m 1; "
        "[inferred] lr 0.05 (the code's default; the README gives none)",
        {
            "dataset": "imagenet",
            "model": "resnet50",
            "optimizer": "ssam-f",
            "epochs": 90,
            "batch_size": 256,
            "lr": 0.05,
            "weight_decay": 1e-4,
            "sparsity": 0.5,
            "num_samples": 128,
            "mask_interval": 1,
            "schedule": "cosine",
        },
        {o: {"rho": 0.7} for o in SAM_RHO},
    ),
    **_VARIANTS,
}


#: ``samopt train`` on a data set without a recipe: settings that fit a CPU where ``TrainConfig``'s would not
#: (Fashion-MNIST: the small CNN for 5 epochs, a few minutes on 2 cores, instead of 200 epochs of a ResNet).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {"fashion-mnist": {"model": "small-cnn", "epochs": 5, "lr": 0.02}}


def resolve(recipe: str | None, explicit: dict[str, Any], kind: type[RunConfig] = TrainConfig) -> RunConfig:
    """Defaults of ``kind``, then the chosen optimizer's own (looksam's --ascend), then ``recipe``'s settings and its
    settings for the chosen optimizer (without a recipe, the data set's :data:`DATASET_DEFAULTS`), then
    ``explicit``."""
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(explicit) - fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; settings are the fields of {kind.__name__}")
    settings: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)} (see `samopt recipes`)")
        r = RECIPES[recipe]
        settings.update(r.settings)
        if kind is not TrainConfig:
            raise ValueError(f"recipes are for `samopt train`; {kind.__name__} has none")
        settings.update(r.per_optimizer.get(_optimizer(explicit, settings, kind), {}))
    elif kind is TrainConfig:
        settings.update(DATASET_DEFAULTS.get(explicit.get("dataset", TrainConfig.dataset), {}))
    settings.update(explicit)
    own = OPTIMIZERS[name].settings if (name := _optimizer(explicit, settings, kind)) in OPTIMIZERS else {}
    return kind(**{**own, **settings})


def _optimizer(explicit: dict[str, Any], settings: dict[str, Any], kind: type[RunConfig]) -> Any:
    return explicit.get("optimizer", settings.get("optimizer", kind.optimizer))


#: Settings a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = frozenset(
    {"data_dir", "download", "workers", "device", "progress", "resume", "out", "deterministic"}
)


def task_kind(cfg: RunConfig) -> str:
    """``"glue"`` or ``"image"``: the kind of task ``cfg`` runs, as the optimizer registry names them."""
    return "glue" if isinstance(cfg, GlueConfig) else "image"


def saved_config(cfg: RunConfig) -> dict[str, Any]:
    """``cfg``'s settings as a checkpoint and ``summary.json`` keep them: ``rho`` is the one the run uses (``--rho``,
    or its optimizer's default for the task), so a run records its rho even where a later samopt changes a default.

    Example::

        saved_config(GlueConfig(optimizer="sam"))["rho"]  # 0.005, GLUE's default
    """
    return dataclasses.asdict(cfg) | {"rho": run_rho(cfg, task_kind(cfg))}


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The settings of ``cfg`` that differ from the ``saved`` ones (:func:`saved_config`), except those a resumed
    run may change; ``rho`` is compared as the run uses it, so a default that changed since ``saved`` is a difference.

    A setting missing from ``saved`` (written before it existed) counts as its default, and a ``rho`` of ``None``
    where ``cfg`` gives none (written before the default was recorded) as today's default.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    now = saved_config(cfg)
    if saved.get("rho") is None and cfg.rho is None:
        now["rho"] = None
    return [
        f"{k}: saved {saved.get(k, defaults.get(k))!r}, now {v!r}"
        for k, v in now.items()
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != v
    ]


def flag(name: str) -> str:
    """The command-line flag of the setting ``name``: ``flag("batch_size") == "--batch-size"``."""
    return "--" + name.replace("_", "-")


def to_flags(settings: dict[str, Any]) -> list[str]:
    """Command-line flags that reproduce ``settings`` (the inverse of the command line's parsing)."""
    flags = []
    for k, v in settings.items():
        if isinstance(v, bool):
            flags.append(flag(k) if v else flag("no_" + k))
        elif isinstance(v, list):
            flags += [flag(k), ",".join(map(str, v))]
        else:
            flags += [flag(k), "none" if v is None else str(v)]
    return flags
