"""The optimizers of ``samopt train`` and ``samopt glue``: one registry, and one training step for each kind.

:data:`OPTIMIZERS` maps each name to an :class:`OptimizerSpec`: what the optimizer is,
the paper it comes from, how it is built from a run's settings, its default ``rho``,
the tasks it runs on and whether it needs SSAM-F's Fisher data. The command line, the
recipes, ``samopt compare``, the training loop and ``samopt optimizers`` all read it;
:func:`spec` is the one place a name is checked. The SAM family runs over any
``torch.optim`` class named by ``base``.

Example::

    opt = build_optimizer(cfg, model, steps_per_epoch=390, fisher_data=loader)
    loss, logits = train_step(opt, model, x, y, loss_fn, amp)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import samopt
from samopt import schedules, validation
from samopt.masks import DynamicSparseMask, FisherMask, RandomMask, sam_on
from samopt.seams import Pass
from samopt.sub_batch import SubBatchAscent

__all__ = [
    "AMP_MODES",
    "MASKED",
    "NAMES",
    "OPTIMIZERS",
    "SAM_FAMILY",
    "Amp",
    "OptimizerSpec",
    "base_optimizer",
    "build_optimizer",
    "spec",
    "tensor_mask",
    "train_step",
]


def base_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name``, case-insensitively (``sgd``, ``adamw``, ``rmsprop``, ...)."""
    classes = {
        k.lower(): v
        for k, v in vars(torch.optim).items()
        if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
    }
    if name.lower() not in classes:
        raise ValueError(f"unknown base optimizer {name!r}; choose a torch.optim class: {', '.join(sorted(classes))}")
    return classes[name.lower()]


def _base_kwargs(cfg: Any, cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    kw: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cls in (torch.optim.SGD, torch.optim.RMSprop):
        kw["momentum"] = cfg.momentum
    if cls is torch.optim.SGD:
        kw["nesterov"] = cfg.nesterov
    accepted = inspect.signature(cls).parameters
    refused = [k for k in kw if k not in accepted]
    if refused:
        raise ValueError(f"base optimizer {cls.__name__} takes no {', '.join(refused)} argument; choose another --base")
    clash = sorted(set(accepted) & set(inspect.signature(samopt.SAM).parameters) - {"params", *kw})
    if clash:
        raise ValueError(
            f"base optimizer {cls.__name__} has its own {', '.join(clash)} argument, which samopt's SAM "
            "cannot pass through; choose another --base"
        )
    return kw


#: ``--ascend``: which steps of the SAM family run the perturbed pass (:mod:`samopt.schedules`): what each
#: does, where it comes from and the settings its source suggests.
ASCEND_POLICIES: dict[str, tuple[str, str, str]] = {
    "always": ("every step (SAM)", "Foret et al., ICLR 2021, arXiv:2010.01412", ""),
    "every": (
        "every --ascend-every steps",
        "MosaicML Composer's SAM interval",
        "its method card scales --rho with the period: --ascend-every 10 --rho 0.5 on ImageNet",
    ),
    "random": (
        "with probability --ascend-prob (constant, or a half cosine to --ascend-prob-end)",
        "SS-SAM / RST, Zhao, Zhang and Hu, arXiv:2203.09962",
        "about 1.5 passes per step (--ascend-prob 0.5) is reported as comparable to SAM",
    ),
    "adaptive": (
        "when ||g||^2 >= its moving mean + c std, c linear from --ae-lambda1 to --ae-lambda2",
        "AE-SAM, Jiang, Yang, Zhang and Kwok, ICLR 2023, arXiv:2304.14647",
        "about half the steps ascend with the defaults (-1 to 1, decay 0.9; ours, inferred)",
    ),
    "late": (
        "the base optimizer until --ascend-from of training, then SAM",
        "Zhou et al., ICLR 2025, arXiv:2410.10373",
        "SAM on the last 12.5% of the epochs: --ascend-from 0.875",
    ),
}
ASCEND = tuple(ASCEND_POLICIES)


def ascent_schedule(cfg: Any, total_steps: int) -> samopt.seams.Schedule:
    """The :mod:`samopt.schedules` policy of ``cfg.ascend`` over a run of ``total_steps`` updates."""
    validation.choice("ascend", cfg.ascend, ASCEND)
    if cfg.ascend == "every":
        return schedules.EveryK(cfg.ascend_every)
    if cfg.ascend == "random":
        end = cfg.ascend_prob_end
        return schedules.RandomAscent(
            cfg.ascend_prob, p_end=end, total_steps=None if end is None else total_steps, seed=cfg.seed
        )
    if cfg.ascend == "adaptive":
        return schedules.AdaptiveAscent(total_steps, lambda1=cfg.ae_lambda1, lambda2=cfg.ae_lambda2, decay=cfg.ae_decay)
    if cfg.ascend == "late":
        validation.unit_interval("ascend_from", cfg.ascend_from, include_one=False)
        return schedules.LatePhase(round(cfg.ascend_from * total_steps))
    return samopt.seams.Schedule()


@dataclass
class _Build:
    """What a builder gets: the run's settings, the model and the run's data and ranks."""

    cfg: Any
    model: nn.Module
    steps_per_epoch: int
    fisher_data: Iterable[Any] | None
    fisher_loss: Callable[..., Tensor]
    ddp: DistributedDataParallel | None
    world: int
    kind: str  # "image" or "glue"

    def plain(self, cls: type[torch.optim.Optimizer]) -> torch.optim.Optimizer:
        params = list(self.model.parameters())  # built as SAM builds its base optimizer: fused where it can be
        return cls(params, **samopt.sam.fuse_kwargs(cls, params, _base_kwargs(self.cfg, cls)))

    @property
    def rho(self) -> float:
        """``--rho``, or the optimizer's default for this kind of run."""
        return sam_rho(self.cfg, self.kind)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def sam(self, cls: type[samopt.SAM], **kw: Any) -> samopt.SAM:
        cfg = self.cfg
        base = base_optimizer(cfg.base)
        engine = {"bn": cfg.bn, "max_grad_norm": cfg.max_grad_norm, "sync": cfg.sync, "ddp": self.ddp}
        if cfg.ascend != "always":
            engine["schedule"] = ascent_schedule(cfg, self.total_steps)
        kw.setdefault("adaptive", cfg.adaptive)
        if cfg.ascent_sub_batches > 1:
            kw["ascent"] = SubBatchAscent(cfg.ascent_sub_batches, inner=kw.pop("mask", None))
        return cls(self.model.parameters(), base, self.rho, **engine, **kw, **_base_kwargs(cfg, base))

    def msam(self) -> samopt.MSAM:
        cfg = self.cfg
        base = base_optimizer(cfg.base)
        return samopt.MSAM(self.model.parameters(), base, self.rho, **_base_kwargs(cfg, base))

    @property
    def every(self) -> int:
        return self.steps_per_epoch * self.cfg.mask_interval


def _fisher(b: _Build) -> samopt.SAM:
    if b.fisher_data is None:
        raise ValueError("ssam-f needs fisher_data, the batches its Fisher information is computed from")
    cfg = b.cfg
    mask = FisherMask(
        b.model,
        b.fisher_data,
        b.fisher_loss,
        cfg.sparsity,
        num_samples=cfg.num_samples // b.world,
        fisher_labels=cfg.fisher_labels,
        update_interval=b.every,
        granularity=cfg.granularity,
        seed=cfg.seed,
    )
    return b.sam(samopt.SAM, eta=cfg.eta, mask=mask)


def _dynamic(b: _Build) -> samopt.SAM:
    cfg = b.cfg
    mask = DynamicSparseMask(
        cfg.sparsity,
        total_steps=b.total_steps,
        drop_rate=cfg.drop_rate,
        drop=cfg.drop,
        grow=cfg.grow,
        update_interval=b.every,
        granularity=cfg.granularity,
        seed=cfg.seed,
    )
    return b.sam(samopt.SAM, eta=cfg.eta, mask=mask)


def _delta(b: _Build) -> samopt.SAM:
    cfg = b.cfg
    return b.sam(
        samopt.DeltaSAM,
        estimator=cfg.estimator,
        num_probes=cfg.num_probes,
        alpha=cfg.alpha,
        clip=cfg.delta_clip,
        seed=cfg.seed,
    )


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the registry: what it is, where it comes from, and how a run builds it."""

    summary: str
    citation: str
    build: Callable[[_Build], torch.optim.Optimizer]
    #: ``rho`` when ``--rho`` is not given; ``None`` for optimizers outside the SAM family.
    rho: float | None = None
    #: ``rho`` of GLUE fine-tuning when ``--rho`` is not given; ``None`` outside the SAM family and for MSAM, whose
    #: rho is on another scale and has no measured GLUE value, so a GLUE run of it must give ``--rho``.
    glue_rho: float | None = None
    #: Whether it needs SSAM-F's Fisher data stream.
    fisher: bool = False
    #: Whether it runs on the SAM engine (two passes, the ``--ascend`` policies); MSAM does not.
    two_pass: bool = True
    #: Its own defaults of other settings (before a recipe's and the user's).
    settings: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] = field(default=("image", "glue"))

    @property
    def sam_family(self) -> bool:
        return self.rho is not None

    def default_rho(self, kind: str) -> float | None:
        """``rho`` when ``--rho`` is not given, for a run of ``kind`` (``"image"`` or ``"glue"``); ``None`` outside
        the SAM family, or where none is known for ``kind``."""
        return self.glue_rho if kind == "glue" else self.rho


_SPARSE = "Mi et al., NeurIPS 2022, arXiv:2210.05177"
#: The SAM family's rho on GLUE: at 0.05 SAM, SSAM-F and δ-SAM stay at the majority class on MiniLM where AdamW
#: learns, and on the grid of 0.005-0.05 the smallest was the best for SAM and SSAM-F in every seed on MRPC and RTE
#: (docs/benchmarks.md, "GLUE: the rho grid"); ASAM's is ten times it, as on images (0.5 against 0.05).
GLUE_RHO = 0.005
#: Every optimizer of ``samopt train`` and ``samopt glue``, by name.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("SGD with momentum", "torch.optim.SGD", lambda b: b.plain(torch.optim.SGD)),
    "adamw": OptimizerSpec(
        "AdamW", "Loshchilov and Hutter, ICLR 2019, arXiv:1711.05101", lambda b: b.plain(torch.optim.AdamW)
    ),
    "sam": OptimizerSpec(
        "SAM over --base",
        "Foret et al., ICLR 2021, arXiv:2010.01412",
        lambda b: b.sam(samopt.SAM, eta=b.cfg.eta),
        rho=0.05,
        glue_rho=GLUE_RHO,
    ),
    "asam": OptimizerSpec(
        "element-wise adaptive SAM (ASAM)",
        "Kwon et al., ICML 2021, arXiv:2102.11600",
        lambda b: b.sam(samopt.SAM, adaptive=True, eta=b.cfg.eta),
        rho=0.5,
        glue_rho=10 * GLUE_RHO,
    ),
    "ssam-f": OptimizerSpec(
        "Sparse SAM with a Fisher-information mask (SSAM-F)", _SPARSE, _fisher, rho=0.05, glue_rho=GLUE_RHO, fisher=True
    ),
    "ssam-d": OptimizerSpec(
        "Sparse SAM with a dynamic sparse mask (SSAM-D)", _SPARSE, _dynamic, rho=0.05, glue_rho=GLUE_RHO
    ),
    "random-mask": OptimizerSpec(
        "SAM with a random mask (Sparse SAM's baseline)",
        _SPARSE,
        lambda b: b.sam(
            samopt.SAM,
            eta=b.cfg.eta,
            mask=RandomMask(b.cfg.sparsity, granularity=b.cfg.granularity, seed=b.cfg.seed),
        ),
        rho=0.05,
        glue_rho=GLUE_RHO,
    ),
    "sam-on": OptimizerSpec(
        "SAM-ON: SAM on the normalisation layers' affine parameters only; the clean pass skips every other "
        "weight gradient",
        "Mueller et al., NeurIPS 2023, arXiv:2306.04226; a larger rho than SAM's, as the paper (0.5: ours, inferred)",
        lambda b: b.sam(samopt.SAM, eta=b.cfg.eta, mask=sam_on(b.model)),
        rho=0.5,
        glue_rho=10 * GLUE_RHO,
    ),
    "looksam": OptimizerSpec(
        "LookSAM: SAM's extra direction every --ascend-every steps, reused with weight --look-alpha in between",
        "Liu et al., CVPR 2022, arXiv:2203.02714",
        lambda b: b.sam(samopt.SAM, eta=b.cfg.eta, descent=samopt.looksam.ReuseOrthogonal(b.cfg.look_alpha)),
        rho=0.05,
        glue_rho=GLUE_RHO,
        settings={"ascend": "every", "ascend_every": 5},
    ),
    "gsam": OptimizerSpec(
        "GSAM: SAM's update minus --gsam-alpha times the clean gradient's orthogonal part; rho follows the lr "
        "down to --rho-min",
        "Zhuang et al., ICLR 2022, arXiv:2203.08065 (alpha 0.2: the official CIFAR example)",
        lambda b: b.sam(
            samopt.SAM,
            eta=b.cfg.eta,
            descent=samopt.gsam.SurrogateGap(b.cfg.gsam_alpha),
            **({} if b.cfg.rho_min is None else {"ascent": samopt.gsam.RhoFollowsLR(b.cfg.rho_min)}),
        ),
        rho=0.05,
        glue_rho=GLUE_RHO,
    ),
    "friendly-sam": OptimizerSpec(
        "Friendly-SAM: the ascent along g minus --fsam-sigma times an EMA (--fsam-lambda) of past gradients",
        "Li et al., CVPR 2024, arXiv:2403.12350 (sigma 1, lambda 0.9: the official class)",
        lambda b: b.sam(
            samopt.SAM, eta=b.cfg.eta, ascent=samopt.fsam.FriendlyDirection(b.cfg.fsam_sigma, b.cfg.fsam_lambda)
        ),
        rho=0.05,
        glue_rho=GLUE_RHO,
    ),
    "vasso": OptimizerSpec(
        "VaSSO: the ascent along an EMA of the gradients (weight --vasso-theta on the new one)",
        "Li and Giannakis, NeurIPS 2023 (theta 0.9: the official code)",
        lambda b: b.sam(samopt.SAM, eta=b.cfg.eta, ascent=samopt.vasso.EMADirection(b.cfg.vasso_theta)),
        rho=0.05,
        glue_rho=GLUE_RHO,
    ),
    "wsam": OptimizerSpec(
        "WSAM: SAM's sharpness term weighted by --wsam-gamma, as a step of its own after the base step (in the "
        "gradient with --wsam-coupled)",
        "Yue et al., KDD 2023 (gamma 0.9, decoupled: the official code)",
        lambda b: b.sam(
            samopt.SAM,
            eta=b.cfg.eta,
            descent=samopt.wsam.WeightedSharpness(b.cfg.wsam_gamma, decouple=not b.cfg.wsam_coupled),
        ),
        rho=0.05,
        glue_rho=GLUE_RHO,
    ),
    "msam": OptimizerSpec(
        "Momentum-SAM: the perturbation along --base's momentum, one forward/backward per step",
        "Becker et al., arXiv:2401.12033 (rho 3: the official README's commands)",
        lambda b: b.msam(),
        rho=3.0,
        two_pass=False,
    ),
    "delta-sam": OptimizerSpec(
        "delta-SAM: SAM with per-example weights on the ascent",
        "Zhou et al., Findings of EMNLP 2022, arXiv:2112.08772",
        _delta,
        rho=0.05,
        glue_rho=GLUE_RHO,
    ),
}
#: The names, in the registry's order.
NAMES = tuple(OPTIMIZERS)
#: The names of the SAM family (the optimizers with a ``rho``).
SAM_FAMILY = tuple(name for name, s in OPTIMIZERS.items() if s.sam_family)


#: The optimizers whose mask ``--granularity`` shapes.
MASKED = ("ssam-f", "ssam-d", "random-mask")


def tensor_mask(cfg: Any) -> bool:
    """Whether ``cfg``'s optimizer perturbs whole tensors, so that its clean pass skips the others (SAM-ON, or a
    mask with ``--granularity tensor``): every step must then ascend."""
    return cfg.optimizer == "sam-on" or (cfg.optimizer in MASKED and cfg.granularity == "tensor")


def spec(name: object) -> OptimizerSpec:
    """The registry's entry for ``name``; a ``ValueError`` naming every choice otherwise."""
    return OPTIMIZERS[validation.choice("optimizer", name, NAMES)]


def run_rho(cfg: Any, kind: str) -> float | None:
    """The rho a run of ``cfg`` uses: ``--rho``, or its optimizer's default for ``kind`` (``"image"`` or
    ``"glue"``); ``None`` for an optimizer outside the SAM family."""
    return cfg.rho if cfg.rho is not None else spec(cfg.optimizer).default_rho(kind)


def sam_rho(cfg: Any, kind: str) -> float:
    """The rho of a run of ``cfg``'s SAM-family optimizer (:func:`run_rho`); a ``ValueError`` where the optimizer
    has no default for ``kind`` and ``--rho`` is not given."""
    rho = run_rho(cfg, kind)
    if rho is None:
        raise ValueError(
            f"rho must be given (--rho) for optimizer {cfg.optimizer!r} on {kind} tasks: its default, "
            f"{spec(cfg.optimizer).rho:g}, is for images and no {kind} value is measured"
        )
    return rho


def build_optimizer(
    cfg: Any,
    model: nn.Module,
    steps_per_epoch: int,
    fisher_data: Iterable[Any] | None = None,
    fisher_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    *,
    ddp: DistributedDataParallel | None = None,
    world: int = 1,
    kind: str = "image",
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``model``'s parameters, configured from ``cfg`` (a RunConfig).

    SSAM-F computes its Fisher information from ``fisher_loss`` on ``fisher_data``. On
    ``world`` ranks, ``ddp`` is the model's DDP wrapper (the SAM family runs its first
    pass under it as ``cfg.sync`` says) and each rank scores ``num_samples / world``
    Fisher examples of its own.
    """
    return spec(cfg.optimizer).build(_Build(cfg, model, steps_per_epoch, fisher_data, fisher_loss, ddp, world, kind))


#: The ``amp`` modes: no autocast, bfloat16 autocast, float16 autocast with a GradScaler.
AMP_MODES = ("none", "bf16", "fp16")


class Amp:
    """Autocast settings and the fp16 ``GradScaler`` of a run: ``mode`` is ``"none"``, ``"bf16"`` or ``"fp16"``."""

    def __init__(self, mode: str, device: torch.device) -> None:
        validation.choice("amp", mode, AMP_MODES)
        if mode == "fp16" and device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; on the CPU use amp='bf16' or 'none'")
        self.mode, self.device = mode, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self) -> Any:
        dtype = torch.float16 if self.mode == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.mode != "none")


def _rows(batch: Any, n: int) -> Any:
    """The first ``n`` rows of a batch: a tensor, or a dict of tensors (a tokenised GLUE batch)."""
    return {k: v[:n] for k, v in batch.items()} if isinstance(batch, dict) else batch[:n]


def train_step(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[..., Tensor],
    amp: Amp,
    max_grad_norm: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One update of ``opt`` on the batch; returns the loss (mean) and the logits of the clean pass at ``w``
    (of the first rows only, with an ascent on a sub-batch).

    ``loss_fn(logits, y, reduction=...)`` is a cross-entropy-like loss. Plain
    optimizers clip to ``max_grad_norm`` here; the SAM family clips inside the
    engine (``SAM(max_grad_norm=)``).
    """
    scaler = amp.scaler
    clean: list[Tensor] = []

    def forward(reduction: str, rows: int | None = None) -> tuple[Tensor, Tensor]:
        with amp.autocast():
            logits = model(x if rows is None else _rows(x, rows))
            return loss_fn(logits, y[:rows], reduction=reduction), logits

    if isinstance(opt, samopt.SAM) and opt.per_example:

        def delta_closure() -> tuple[Tensor, Tensor]:
            losses, logits = forward("none")
            if not clean and torch.is_grad_enabled():  # the clean pass at w (probes run without grad)
                clean.append(logits.detach())
            return losses.float(), logits

        loss = opt.step(delta_closure, scaler=scaler)
    elif isinstance(opt, samopt.SAM):

        def closure(p: Pass) -> Tensor:  # the clean pass on the first 1/m of the batch with --ascent-sub-batches m
            loss, logits = forward("mean", len(y) // p.sub_batches)
            if not clean:
                clean.append(logits.detach())
            scaler.scale(loss).backward()
            return loss.detach()

        loss = opt.step(closure, scaler=scaler)
    else:
        opt.zero_grad(set_to_none=True)
        loss, logits = forward("mean")
        clean.append(logits.detach())
        scaler.scale(loss).backward()
        if max_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(opt)
        loss = loss.detach()
    scaler.update()
    return loss.float(), clean[0]
