"""GSAM (Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan and Liu, "Surrogate Gap Guided
Sharpness-Aware Minimization", ICLR 2022, arXiv:2203.08065): SAM's update minus a multiple of the part of the clean
gradient orthogonal to it, with ``rho`` that follows the learning rate.

With ``g`` at ``w`` and ``g_p`` at ``w + e``, the update gradient is ``g_p - alpha g_perp``,
``g_perp = g - (<g, g_p> / ||g_p||^2) g_p`` over the whole parameter vector: descending
along it lowers the surrogate gap without changing the perturbed loss to first order.
The official PyTorch code (juntang-zhuang/GSAM ``gsam/gsam.py``) writes the projection as
``cos(g, g_p) ||g|| g_p / (||g_p|| + eps)`` with ``cos = <g, g_p> / (||g|| ||g_p|| + eps)``,
``eps = 1e-12``; samopt computes the same expression. ``rho_t = rho_min + (rho_max -
rho_min)(lr_t - lr_min) / (lr_max - lr_min)`` (:class:`RhoFollowsLR`) reads each group's
current ``lr``, so any torch LR scheduler drives it; ``lr_max`` is the group's ``lr`` when
the optimizer is built. ``alpha = 0`` with a constant ``rho`` is SAM.

Where samopt differs from the official code: inner products and norms accumulate in
float64 (the official in the gradients' dtype); the projection uses gradients averaged
over the ranks (the official PyTorch code projects each rank's own and sums without
dividing in one version); ``adaptive=True`` scales ``e`` as ASAM (the official default
in its CIFAR script, ``T^2 g / ||T g||``, is the same form).

Example::

    opt = samopt.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.01, alpha=0.2, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)   # rho follows it
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import functional as kernels
from samopt import validation
from samopt.sam import SAM
from samopt.seams import AroundAscent, Ascent, Descent, GroupGrads, Move

__all__ = ["GSAM", "RhoFollowsLR", "SurrogateGap"]

#: The official code's epsilon in the cosine and the projection.
EPS = 1e-12


class SurrogateGap(Descent):
    """GSAM's descent: ``g_p - alpha g_perp``, ``g_perp`` the part of the clean gradient orthogonal to ``g_p``.

    Zhuang et al., ICLR 2022, arXiv:2203.08065.

    Args:
        alpha: the weight of the orthogonal part (>= 0; 0: SAM's ``g_p``).
    """

    needs_clean = True

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = validation.nonnegative("alpha", alpha)

    def bind(self, params: list[Tensor], owner: object, *, sharded: bool = False) -> None:
        if sharded:
            raise ValueError("GSAM over FSDP-sharded parameters is not supported; use it with DDP or one process")

    @torch.no_grad()
    def combine(self, params: list[Tensor], clean: list[Tensor] | None, grads: list[Tensor]) -> None:
        assert clean is not None  # needs_clean
        if self.alpha == 0:
            return
        norm_g = kernels.global_norm(clean).double()
        norm_p = kernels.global_norm(grads).double()
        cos = kernels.global_dot(clean, grads) / (norm_g * norm_p + EPS)
        coef = cos * norm_g / (norm_p + EPS)  # g_perp = g - coef g_p
        # g_p - alpha (g - coef g_p) = (1 + alpha coef) g_p - alpha g
        for gs, cs in kernels.buckets(grads, clean):
            torch._foreach_mul_(gs, (1 + self.alpha * coef).to(device=gs[0].device, dtype=gs[0].dtype))
            torch._foreach_add_(gs, cs, alpha=-self.alpha)

    def __repr__(self) -> str:
        return f"SurrogateGap(alpha={self.alpha})"


class RhoFollowsLR(AroundAscent):
    """``inner``'s ascent with each group's ``rho`` set from its learning rate before every perturbation:
    ``rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min) / (lr_max - lr_min)`` (GSAM's schedule: Zhuang et al.,
    ICLR 2022, arXiv:2203.08065).

    ``rho_max`` and ``lr_max`` are each group's ``rho`` and ``lr`` when the optimizer is
    built (kept in the state dict); ``group["rho"]`` shows the current ``rho_t``.

    Args:
        rho_min: ``rho`` at ``lr = lr_min`` (>= 0, at most every group's ``rho``).
        lr_min: the learning rate the schedule ends at (>= 0, below every group's ``lr``).
    """

    def __init__(self, rho_min: float, lr_min: float = 0.0, inner: Ascent | None = None) -> None:
        super().__init__(inner)
        self.rho_min = validation.nonnegative("rho_min", rho_min)
        self.lr_min = validation.nonnegative("lr_min", lr_min)
        self.ends: list[tuple[float, float]] = []  # (rho_max, lr_max) of each group
        # the owner, whose param_groups are read at each step: load_state_dict (and so accelerate's prepare, which
        # reloads an optimizer's state on its device) replaces the group dicts
        self._owner: Any = None

    def bind(self, params: list[Tensor], owner: object, group: Any = None, *, sharded: bool = False) -> None:
        super().bind(params, owner, group, sharded=sharded)
        self._owner = weakref.ref(owner)
        known = len(self.ends)
        for i, g in enumerate(owner.param_groups[known:], start=known):  # type: ignore[attr-defined]  # a group added later gets its own ends
            rho_max, lr_max = float(g["rho"]), float(g["lr"])
            if self.rho_min > rho_max:
                raise ValueError(
                    f"rho_min must be at most rho (the schedule's rho_max), got rho_min={self.rho_min} > "
                    f"param_groups[{i}]['rho']={rho_max}"
                )
            if self.lr_min >= lr_max:
                raise ValueError(
                    f"lr_min must be below lr (the schedule's lr_max), got lr_min={self.lr_min} >= "
                    f"param_groups[{i}]['lr']={lr_max}"
                )
            self.ends.append((rho_max, lr_max))

    def rho(self, index: int, lr: float) -> float:
        """``rho_t`` of group ``index`` at learning rate ``lr``."""
        rho_max, lr_max = self.ends[index]
        return self.rho_min + (rho_max - self.rho_min) * (lr - self.lr_min) / (lr_max - self.lr_min)

    def perturb(self, groups: Sequence[GroupGrads], norm: Tensor, move: Move) -> None:
        for i, g in enumerate(self._owner().param_groups):
            g["rho"] = self.rho(i, float(g["lr"]))
        super().perturb(groups, norm, move)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "ends": [list(e) for e in self.ends]}

    def check_state(self, state: object) -> None:
        ends = state.get("ends") if isinstance(state, dict) else None
        numbers = [v for e in ends if isinstance(e, list) and len(e) == 2 for v in e] if isinstance(ends, list) else []
        if not (
            isinstance(state, dict)
            and set(state) == {"inner", "ends"}
            and isinstance(ends, list)
            and len(numbers) == 2 * len(ends)
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
        ):
            raise ValueError(
                f"RhoFollowsLR's state must be {{'inner': ..., 'ends': [[rho_max, lr_max], ...]}}, got {state!r}"
            )
        self.inner.check_state(state["inner"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.inner.load_state_dict(state["inner"])
        self.ends = [(float(r), float(lr)) for r, lr in state["ends"]]

    def __repr__(self) -> str:
        return f"RhoFollowsLR(rho_min={self.rho_min}, lr_min={self.lr_min}, inner={self.inner!r})"


def GSAM(
    params: ParamsT,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    rho: float = 0.05,
    *,
    alpha: float = 0.2,
    rho_min: float | None = None,
    lr_min: float = 0.0,
    **kwargs: Any,
) -> SAM:
    """GSAM: ``SAM(params, base_optimizer, rho, descent=SurrogateGap(alpha), ascent=RhoFollowsLR(rho_min, lr_min))``.

    ``rho`` is ``rho_max``; ``rho_min=None`` keeps ``rho`` constant (the official CIFAR
    example: ``rho_max = rho_min``). ``alpha = 0.2`` is the official PyTorch example's;
    the authors' ViT-B/32 ImageNet setting is ``rho`` 0.6 to 0.1 with ``alpha = 0.6``.
    Zhuang et al., ICLR 2022, arXiv:2203.08065; official code juntang-zhuang/GSAM.

    Example::

        opt = samopt.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.01, alpha=0.2, lr=0.1)
    """
    ascent = None if rho_min is None else RhoFollowsLR(rho_min, lr_min, inner=kwargs.pop("ascent", None))
    return SAM(params, base_optimizer, rho, descent=SurrogateGap(alpha), ascent=ascent, **kwargs)
