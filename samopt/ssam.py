"""Sparse SAM (Mi et al., NeurIPS 2022, arXiv:2210.05177) as ready-made configurations of :class:`samopt.SAM`.

``SSAMF`` is SAM with a :class:`~samopt.masks.FisherMask`, ``SSAMD`` SAM with a
:class:`~samopt.masks.DynamicSparseMask`; everything else (BatchNorm, mixed
precision, clipping, resume) is the engine's. (The bare name ``SSAM`` is avoided:
Stable SAM uses it.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from samopt.masks import DynamicSparseMask, FisherMask
from samopt.sam import SAM

__all__ = ["SSAMD", "SSAMF"]


class SSAMF(SAM):
    """SSAM-F: SAM that perturbs only the entries with the largest empirical Fisher information.

    ``SSAMF(params, base, model=..., fisher_data=..., loss_fn=..., **kw)`` is
    ``SAM(params, base, mask=FisherMask(model, fisher_data, loss_fn, ...), **kw)``;
    see :class:`samopt.masks.FisherMask` for the mask arguments and
    :class:`samopt.SAM` for the rest (``adaptive``, ``bn``, ``max_grad_norm``, the
    base optimizer's keywords).

    Example::

        opt = samopt.SSAMF(model.parameters(), torch.optim.SGD, model=model, fisher_data=train_loader,
                           loss_fn=F.cross_entropy, rho=0.1, sparsity=0.5, num_samples=16,
                           update_interval=390, lr=0.05, momentum=0.9)
        opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        model: nn.Module,
        fisher_data: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        rho: float = 0.05,
        sparsity: float = 0.5,
        num_samples: int = 128,
        update_interval: int | None = 390,
        fisher_labels: str = "true",
        granularity: str = "element",
        renormalize: bool = False,
        chunk_size: int | None = None,
        vectorize: bool | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        mask = FisherMask(
            model,
            fisher_data,
            loss_fn,
            sparsity,
            num_samples=num_samples,
            update_interval=update_interval,
            fisher_labels=fisher_labels,
            granularity=granularity,
            renormalize=renormalize,
            chunk_size=chunk_size,
            vectorize=vectorize,
            seed=seed,
        )
        super().__init__(params, base_optimizer, rho=rho, mask=mask, **kwargs)


class SSAMD(SAM):
    """SSAM-D: SAM whose perturbation mask evolves by dynamic sparse training (drop and grow).

    ``SSAMD(params, base, total_steps=..., **kw)`` is
    ``SAM(params, base, mask=DynamicSparseMask(..., total_steps=...), **kw)``; see
    :class:`samopt.masks.DynamicSparseMask` for the mask arguments and
    :class:`samopt.SAM` for the rest.

    Example::

        opt = samopt.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=0.5,
                           drop="gradient", grow="random", update_interval=390, total_steps=78000,
                           lr=0.05, momentum=0.9)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        total_steps: int,
        rho: float = 0.05,
        sparsity: float = 0.5,
        drop_rate: float = 0.5,
        drop: str = "gradient",
        grow: str = "random",
        update_interval: int | None = 390,
        granularity: str = "element",
        renormalize: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        mask = DynamicSparseMask(
            sparsity,
            total_steps=total_steps,
            drop_rate=drop_rate,
            drop=drop,
            grow=grow,
            update_interval=update_interval,
            granularity=granularity,
            renormalize=renormalize,
            seed=seed,
        )
        super().__init__(params, base_optimizer, rho=rho, mask=mask, **kwargs)
