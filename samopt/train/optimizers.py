"""The optimizers of ``samopt train`` by name, and one training step for each kind.

Names (:data:`OPTIMIZERS`): ``sgd`` and ``adamw`` (plain torch), ``sam`` (Foret et
al., ICLR 2021), ``asam`` (Kwon et al., ICML 2021), ``ssam-f`` / ``ssam-d`` (Sparse
SAM with a Fisher or dynamic sparse mask, Mi et al., NeurIPS 2022), ``random-mask``
(Sparse SAM's random-mask baseline) and ``delta-sam`` (Zhou et al., EMNLP Findings
2022). The SAM family runs over any ``torch.optim`` class named by ``base``.

Example::

    opt = build_optimizer(cfg, model, steps_per_epoch=390, fisher_data=loader)
    loss, logits = train_step(opt, model, x, y, loss_fn, amp)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import samopt
from samopt import validation
from samopt.masks import DynamicSparseMask, FisherMask, Mask, RandomMask

__all__ = ["AMP_MODES", "OPTIMIZERS", "Amp", "base_optimizer", "build_optimizer", "train_step"]

OPTIMIZERS = ("sgd", "adamw", "sam", "asam", "ssam-f", "ssam-d", "random-mask", "delta-sam")
#: Default rho when none is given: 0.05 for SAM (Foret et al.), 0.5 for ASAM (Kwon et al., CIFAR setting).
DEFAULT_RHO = {"asam": 0.5}


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


def build_optimizer(
    cfg: Any,
    model: nn.Module,
    steps_per_epoch: int,
    fisher_data: Iterable[Any] | None = None,
    fisher_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    *,
    ddp: DistributedDataParallel | None = None,
    world: int = 1,
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``model``'s parameters, configured from ``cfg`` (a RunConfig).

    SSAM-F computes its Fisher information from ``fisher_loss`` on ``fisher_data``. On
    ``world`` ranks, ``ddp`` is the model's DDP wrapper (the SAM family runs its first
    pass under it as ``cfg.sync`` says) and each rank scores ``num_samples / world``
    Fisher examples of its own.
    """
    name = cfg.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    params = model.parameters()
    if name in ("sgd", "adamw"):
        cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
        return cls(params, **_base_kwargs(cfg, cls))
    base = base_optimizer(cfg.base)
    kw = _base_kwargs(cfg, base)
    rho = cfg.rho if cfg.rho is not None else DEFAULT_RHO.get(name, 0.05)
    engine = {"bn": cfg.bn, "max_grad_norm": cfg.max_grad_norm, "sync": cfg.sync, "ddp": ddp}
    if name == "delta-sam":
        return samopt.DeltaSAM(
            params,
            base,
            rho,
            estimator=cfg.estimator,
            num_probes=cfg.num_probes,
            alpha=cfg.alpha,
            clip=cfg.delta_clip,
            seed=cfg.seed,
            **engine,
            **kw,
        )
    mask = _mask(cfg, model, steps_per_epoch, fisher_data, fisher_loss, world)
    return samopt.SAM(params, base, rho, adaptive=name == "asam", eta=cfg.eta, mask=mask, **engine, **kw)


def _mask(
    cfg: Any,
    model: nn.Module,
    steps_per_epoch: int,
    fisher_data: Iterable[Any] | None,
    fisher_loss: Callable[..., Tensor],
    world: int = 1,
) -> Mask | None:
    every = steps_per_epoch * cfg.mask_interval
    common = {"granularity": cfg.granularity, "seed": cfg.seed}
    if cfg.optimizer == "ssam-f":
        if fisher_data is None:
            raise ValueError("ssam-f needs fisher_data, the batches its Fisher information is computed from")
        return FisherMask(
            model,
            fisher_data,
            fisher_loss,
            cfg.sparsity,
            num_samples=cfg.num_samples // world,
            fisher_labels=cfg.fisher_labels,
            update_interval=every,
            **common,
        )
    if cfg.optimizer == "ssam-d":
        total = steps_per_epoch * cfg.epochs
        return DynamicSparseMask(
            cfg.sparsity,
            total_steps=total,
            drop_rate=cfg.drop_rate,
            drop=cfg.drop,
            grow=cfg.grow,
            update_interval=every,
            **common,
        )
    if cfg.optimizer == "random-mask":
        return RandomMask(cfg.sparsity, **common)
    return None


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


def train_step(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[..., Tensor],
    amp: Amp,
    max_grad_norm: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One update of ``opt`` on the batch; returns the loss (mean) and the logits of the clean pass at ``w``.

    ``loss_fn(logits, y, reduction=...)`` is a cross-entropy-like loss. Plain
    optimizers clip to ``max_grad_norm`` here; the SAM family clips inside the
    engine (``SAM(max_grad_norm=)``).
    """
    scaler = amp.scaler
    clean: list[Tensor] = []

    def forward(reduction: str) -> tuple[Tensor, Tensor]:
        with amp.autocast():
            logits = model(x)
            return loss_fn(logits, y, reduction=reduction), logits

    if isinstance(opt, samopt.SAM) and opt.per_example:

        def delta_closure() -> tuple[Tensor, Tensor]:
            losses, logits = forward("none")
            if not clean and torch.is_grad_enabled():  # the clean pass at w (probes run without grad)
                clean.append(logits.detach())
            return losses.float(), logits

        loss = opt.step(delta_closure, scaler=scaler)
    elif isinstance(opt, samopt.SAM):

        def closure() -> Tensor:
            loss, logits = forward("mean")
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
