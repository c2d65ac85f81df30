"""Friendly-SAM (Li, Zhou, He, Cheng and Huang, "Friendly Sharpness-Aware Minimization", CVPR 2024,
arXiv:2403.12350): perturb along the clean gradient minus ``sigma`` times an EMA of the past clean gradients.

The EMA ``m`` estimates the full-batch gradient, whose part of ``g`` the paper argues
hurts generalisation; the ascent is along ``d_t = g_t - sigma m_{t-1}``, then
``m_t = lambda m_{t-1} + (1 - lambda) g_t`` with the *raw* ``g_t`` (not ``d_t``), and
``e = rho d / ||d||``; on the first step ``d_1 = m_1 = g_1`` (SAM). This is the order of
the official code (nblt/F-SAM ``utils.py``, ``FriendlySAM.first_step``): ``d`` uses the
EMA *before* this step's update (a written form that updates ``m`` first differs).
Defaults: ``sigma = 1``, ``lmbda = 0.9`` (the official class; its training script uses
0.95). Where samopt differs: no epsilon in the norm (the official adds 1e-12; a zero
``d`` gives no perturbation here), and ``adaptive=True`` scales ``d`` as ASAM does.

Example::

    opt = samopt.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.95, lr=0.1)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import validation
from samopt.sam import SAM
from samopt.seams import DirectionAscent

__all__ = ["FriendlyDirection", "FriendlySAM"]


class FriendlyDirection(DirectionAscent):
    """Friendly-SAM's ascent: along ``g_t - sigma m_{t-1}``, ``m`` the EMA (factor ``lmbda`` in ``[0, 1)``) of the
    raw clean gradients; ``sigma >= 0`` (0: SAM). Li et al., CVPR 2024, arXiv:2403.12350."""

    def __init__(self, sigma: float = 1.0, lmbda: float = 0.9) -> None:
        super().__init__()
        self.sigma = validation.nonnegative("sigma", sigma)
        self.lmbda = validation.unit_interval("lmbda", lmbda, include_one=False)

    def direction(self, index: list[int], grads: list[Tensor]) -> list[Tensor]:
        out = []
        for i, g in zip(index, grads, strict=True):
            m = self.buffers.get(i)
            out.append(g.clone() if m is None or self.sigma == 0 else torch.add(g, m, alpha=-self.sigma))
        return out

    def commit(self, index: list[int], grads: list[Tensor], directions: list[Tensor]) -> None:
        for i, g in zip(index, grads, strict=True):
            m = self.buffers.get(i)
            self.buffers[i] = g.clone() if m is None else torch.add(m * self.lmbda, g, alpha=1 - self.lmbda)

    def __repr__(self) -> str:
        return f"FriendlyDirection(sigma={self.sigma}, lmbda={self.lmbda})"


def FriendlySAM(
    params: ParamsT,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    rho: float = 0.05,
    *,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    **kwargs: Any,
) -> SAM:
    """Friendly-SAM: ``SAM(params, base_optimizer, rho, ascent=FriendlyDirection(sigma, lmbda), ...)``, with the
    official class's defaults (``rho = 0.05``, ``sigma = 1``, ``lmbda = 0.9``). Li et al., CVPR 2024,
    arXiv:2403.12350; official code nblt/F-SAM.

    Example::

        opt = samopt.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    """
    return SAM(params, base_optimizer, rho, ascent=FriendlyDirection(sigma, lmbda), **kwargs)
