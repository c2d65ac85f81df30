"""VaSSO (Li and Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance Suppression",
NeurIPS 2023): perturb along an EMA of the clean gradients instead of the noisy gradient itself.

``d_t = (1 - theta) d_{t-1} + theta g_t`` (``d_1 = g_1``) and ``e = rho d / ||d||``,
the descent SAM's. ``theta`` weights the *new* gradient, as in the official code
(BingcongLi/VaSSO ``solver/vasso.py``, default 0.9): ``theta = 1`` is SAM, a smaller
``theta`` smooths more. Where samopt differs from that code: the norm has no epsilon
(the official adds 1e-7; a zero ``d`` gives no perturbation here instead), and with
``adaptive=True`` the direction is scaled as ASAM's (``T^2 d / ||T d||``).

Example::

    opt = samopt.VaSSO(model.parameters(), torch.optim.SGD, rho=0.1, theta=0.9, lr=0.1, momentum=0.9)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import validation
from samopt.sam import SAM
from samopt.seams import DirectionAscent

__all__ = ["EMADirection", "VaSSO"]


class EMADirection(DirectionAscent):
    """VaSSO's ascent: along ``d_t = (1 - theta) d_{t-1} + theta g_t`` (``d_1 = g_1``); ``theta`` in ``(0, 1]``.

    Li and Giannakis, NeurIPS 2023.
    """

    def __init__(self, theta: float = 0.9) -> None:
        super().__init__()
        self.theta = validation.unit_interval("theta", theta, include_one=True)
        if self.theta == 0:
            raise ValueError("theta must be a real number in (0, 1], got 0 (d would never see a gradient)")

    def direction(self, index: list[int], grads: list[Tensor]) -> list[Tensor]:
        out = []
        for i, g in zip(index, grads, strict=True):
            d = self.buffers.get(i)
            out.append(g.clone() if d is None else torch.add(d * (1 - self.theta), g, alpha=self.theta))
        return out

    def commit(self, index: list[int], grads: list[Tensor], directions: list[Tensor]) -> None:
        self.buffers.update(zip(index, directions, strict=True))

    def __repr__(self) -> str:
        return f"EMADirection(theta={self.theta})"


def VaSSO(
    params: ParamsT,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    rho: float = 0.05,
    *,
    theta: float = 0.9,
    **kwargs: Any,
) -> SAM:
    """VaSSO: ``SAM(params, base_optimizer, rho, ascent=EMADirection(theta), ...)``; the defaults are the official
    code's (``rho = 0.05``, ``theta = 0.9``; its CIFAR-100 script uses ``rho = 0.2``). Li and Giannakis,
    NeurIPS 2023; official code BingcongLi/VaSSO.

    Example::

        opt = samopt.VaSSO(model.parameters(), torch.optim.SGD, rho=0.2, theta=0.9, lr=0.1, momentum=0.9)
    """
    return SAM(params, base_optimizer, rho, ascent=EMADirection(theta), **kwargs)
