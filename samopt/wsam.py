"""WSAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization Term",
KDD 2023): SAM's sharpness term weighted against the plain loss.

With ``alpha = gamma / (1 - gamma)`` the objective is ``L(w) + alpha (L(w + e) - L(w))``.
The decoupled form (the default, and the paper's) steps the base optimizer with ``g``
and then moves the weights by ``-lr alpha (g_p - g)``, so the sharpness term gets no
momentum, preconditioning or weight decay; the coupled form steps with ``g + alpha
(g_p - g)``, which is SAM at ``gamma = 0.5``. As the official code (dlrover
``atorch/atorch/optimizers/wsam.py``, ``WeightedSAM``), ``lr`` is each group's after the
base step. Where samopt differs: the official code clips ``g`` and ``g_p`` separately
(``max_norm``); samopt's ``max_grad_norm`` clips the gradient the base optimizer
steps with (``g`` when decoupled), and the sharpness step is not clipped.

Example::

    opt = samopt.WSAM(model.parameters(), torch.optim.SGD, rho=0.2, gamma=0.9, lr=0.1, momentum=0.9)
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import validation
from samopt.functional import buckets
from samopt.sam import SAM
from samopt.seams import Descent

__all__ = ["WSAM", "WeightedSharpness"]


class WeightedSharpness(Descent):
    """WSAM's descent: the sharpness term ``g_p - g`` weighted by ``alpha = gamma / (1 - gamma)``.

    Yue et al., KDD 2023.

    Args:
        gamma: the weight, in ``[0, 1)`` (0.9 in the official code; 0.5 coupled is SAM).
        decouple: step with ``g``, then move by ``-lr alpha (g_p - g)`` (True, the paper's); or step with
            ``g + alpha (g_p - g)``.
    """

    needs_clean = True

    def __init__(self, gamma: float = 0.9, decouple: bool = True) -> None:
        self.gamma = validation.unit_interval("gamma", gamma, include_one=False)
        self.decouple = validation.boolean("decouple", decouple)
        self.alpha = self.gamma / (1 - self.gamma)
        self._sharpness: dict[Tensor, Tensor] = {}  # parameter -> g_p - g, until the update is applied
        self._owner: Any = None

    @property
    def updates_after(self) -> bool:  # type: ignore[override]
        return self.decouple

    def bind(self, params: list[Tensor], owner: object, *, sharded: bool = False) -> None:
        self._owner = weakref.ref(owner)

    @torch.no_grad()
    def combine(self, params: list[Tensor], clean: list[Tensor] | None, grads: list[Tensor]) -> None:
        assert clean is not None  # needs_clean
        self._sharpness = {}
        if not self.decouple:
            if self.alpha != 1:  # alpha = 1: g_p itself
                for gs, cs in buckets(grads, clean):
                    torch._foreach_mul_(gs, self.alpha)
                    torch._foreach_add_(gs, cs, alpha=1 - self.alpha)
            return
        sharpness = torch._foreach_sub(grads, clean)
        self._sharpness = dict(zip(params, sharpness, strict=True))
        for gs, cs in buckets(grads, clean):
            torch._foreach_copy_(gs, cs)

    def without_ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        self._sharpness = {}

    @torch.no_grad()
    def after_update(self) -> None:
        sharpness, self._sharpness = self._sharpness, {}
        if not sharpness or self.alpha == 0:
            return
        for group in self._owner().param_groups:
            pairs = [(p, sharpness[p]) for p in group["params"] if p in sharpness]
            for ps, ss in buckets([p for p, _ in pairs], [s for _, s in pairs]):
                torch._foreach_add_(ps, ss, alpha=-float(group["lr"]) * self.alpha)

    def __repr__(self) -> str:
        return f"WeightedSharpness(gamma={self.gamma}, decouple={self.decouple})"


def WSAM(
    params: ParamsT,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    rho: float = 0.05,
    *,
    gamma: float = 0.9,
    decouple: bool = True,
    **kwargs: Any,
) -> SAM:
    """WSAM: ``SAM(params, base_optimizer, rho, descent=WeightedSharpness(gamma, decouple), ...)``, with the
    official code's defaults (``rho = 0.05``, ``gamma = 0.9``, decoupled; its example script uses ``rho = 0.2``).
    Yue et al., KDD 2023; official code in dlrover (``atorch/atorch/optimizers/wsam.py``).

    Example::

        opt = samopt.WSAM(model.parameters(), torch.optim.SGD, rho=0.2, gamma=0.9, lr=0.1, momentum=0.9)
    """
    return SAM(params, base_optimizer, rho, descent=WeightedSharpness(gamma, decouple), **kwargs)
