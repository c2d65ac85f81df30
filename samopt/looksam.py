"""LookSAM (Liu, Mai, Chen, Hsieh and You, "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022, arXiv:2203.02714): SAM's extra direction, computed every few steps and reused in between.

On a step that ascends, the update is SAM's ``g_p``, and the descent policy caches
``g_v``, the component of ``g_p`` orthogonal to the clean gradient ``g`` over the whole
parameter vector: ``g_v = g_p - (<g_p, g> / ||g||^2) g``. On a step that does not ascend
(one forward/backward) the update is ``g + alpha ||g|| / ||g_v|| g_v``. Which steps
ascend is the schedule's choice: every ``k`` steps in the paper; with
:class:`~samopt.schedules.AdaptiveAscent` it is AE-LookSAM (Jiang et al., ICLR 2023).

Example::

    opt = samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=5, alpha=0.7, lr=0.1, momentum=0.9)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import validation
from samopt.functional import global_dot
from samopt.sam import SAM
from samopt.schedules import EveryK
from samopt.seams import Descent, per_parameter

__all__ = ["LookSAM", "ReuseOrthogonal", "reuse_orthogonal", "reuse_orthogonal_reference"]


@torch.no_grad()
def reuse_orthogonal(clean: list[Tensor], perturbed: list[Tensor]) -> tuple[list[Tensor], float]:
    """LookSAM's cached direction ``g_v = g_p - (<g_p, g> / ||g||^2) g`` and ``||g_v||`` (``g_v = g_p`` if
    ``g = 0``)."""
    g2 = global_dot(clean, clean)
    coef = (global_dot(perturbed, clean) / g2).item() if g2.item() > 0 else 0.0
    g_v = [p - coef * c for c, p in zip(clean, perturbed, strict=True)]
    return g_v, global_dot(g_v, g_v).sqrt().item()


def reuse_orthogonal_reference(clean: Tensor, perturbed: Tensor) -> Tensor:
    """:func:`reuse_orthogonal`'s ``g_v`` on one flat vector, written as the paper does, for tests."""
    g, g_p = clean.double(), perturbed.double()
    cos = (g_p @ g) / (g_p.norm() * g.norm())
    return (g_p - g_p.norm() * cos * g / g.norm()).to(perturbed.dtype)


class ReuseOrthogonal(Descent):
    """LookSAM's descent policy: SAM's ``g_p`` on an ascending step (caching ``g_v``), ``g + alpha ||g|| / ||g_v||
    g_v`` on the others (the plain ``g`` before the first cache, or when ``g_v = 0``). Liu et al., CVPR 2022,
    arXiv:2203.02714.

    The cache (one tensor per parameter, as much memory as the weights) is in
    :meth:`state_dict`, so a resumed run reuses what the uninterrupted one would.

    Args:
        alpha: the weight of the reused direction, >= 0 (0.7 in the paper).
    """

    needs_clean = True

    def __init__(self, alpha: float = 0.7) -> None:
        self.alpha = validation.nonnegative("alpha", alpha)
        self.cache: dict[int, Tensor] = {}  # index of the parameter -> its part of g_v
        self.norm = 0.0  # ||g_v||
        self._index: dict[Tensor, int] = {}
        self._shapes: list[torch.Size] = []

    def bind(self, params: list[Tensor], owner: object, *, sharded: bool = False) -> None:
        if sharded:
            raise ValueError("LookSAM over FSDP-sharded parameters is not supported; use it with DDP or one process")
        self._index = {p: i for i, p in enumerate(params)}
        self._shapes = [p.shape for p in params]

    @torch.no_grad()
    def combine(self, params: list[Tensor], clean: list[Tensor] | None, grads: list[Tensor]) -> None:
        assert clean is not None  # needs_clean
        g_v, self.norm = reuse_orthogonal(clean, grads)
        self.cache = {self._index[p]: v for p, v in zip(params, g_v, strict=True)}

    @torch.no_grad()
    def without_ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        if not self.cache or self.norm == 0 or self.alpha == 0:
            return
        g_norm = global_dot(grads, grads).sqrt().item()
        scale = self.alpha * g_norm / self.norm
        for p, g in zip(params, grads, strict=True):
            v = self.cache.get(self._index[p])
            if v is not None:
                g.add_(v.to(g.dtype), alpha=scale)

    def state_dict(self) -> dict[str, Any]:
        return {"cache": dict(self.cache), "norm": self.norm}

    def check_state(self, state: object) -> None:
        ok = isinstance(state, dict) and set(state) == {"cache", "norm"}
        ok = ok and isinstance(state["norm"], float) and state["norm"] >= 0  # type: ignore[index]
        ok = ok and per_parameter(state["cache"], self._shapes, "ReuseOrthogonal's cached direction")  # type: ignore[index]
        if not ok:
            raise ValueError(
                "ReuseOrthogonal's state must be {'cache': {parameter index: tensor}, 'norm': a float >= 0}, "
                f"got {state!r}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.cache, self.norm = dict(state["cache"]), state["norm"]

    def __repr__(self) -> str:
        return f"ReuseOrthogonal(alpha={self.alpha})"


def LookSAM(
    params: ParamsT,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    rho: float = 0.05,
    *,
    k: int | None = None,
    alpha: float = 0.7,
    **kwargs: Any,
) -> SAM:
    """LookSAM: SAM every ``k`` steps, the cached direction reused in between (one forward/backward).

    ``SAM(params, base_optimizer, rho, descent=ReuseOrthogonal(alpha), schedule=EveryK(k), ...)``;
    ``k`` defaults to 5 (the paper reports ``k >= 5``); give ``schedule=`` (for example
    :class:`~samopt.schedules.AdaptiveAscent`: AE-LookSAM) instead of ``k`` to choose the
    refresh steps another way. ``k = 1`` is SAM. Liu et al., CVPR 2022, arXiv:2203.02714.

    Example::

        opt = samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=5, alpha=0.7, lr=0.1)
    """
    if kwargs.get("schedule") is not None and k is not None:
        raise ValueError("give k or schedule=, not both: k makes the schedule EveryK(k)")
    if kwargs.get("schedule") is None:
        kwargs["schedule"] = EveryK(5 if k is None else k)
    return SAM(params, base_optimizer, rho, descent=ReuseOrthogonal(alpha), **kwargs)
