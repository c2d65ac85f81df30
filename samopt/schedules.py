"""When a SAM step ascends: schedule policies (:class:`samopt.seams.Schedule`) that skip the perturbed pass.

A step that does not ascend runs the closure once and steps the base optimizer with
the clean gradient, so it costs one forward/backward instead of two. The decision
may read ``||g||`` of the clean gradient, which the step computes anyway. Every rank
takes the same decision: the policies are deterministic functions of the step, their
state and the (averaged) gradient norm, and under ``sync="local"`` the engine lets a
step ascend on every rank if it does on any.

- :class:`EveryK`: every ``k``-th step (periodic SAM, as MosaicML Composer's
  ``interval``; its method card advises scaling ``rho`` with ``k``, e.g. ``rho=0.5``
  at ``k=10``).
- :class:`RandomAscent`: with probability ``p_t``, constant or along a half cosine
  (SS-SAM / RST, Zhao, Zhang and Hu, arXiv preprint 2022, arXiv:2203.09962).
- :class:`AdaptiveAscent`: when ``||g||^2`` is large against its running mean and
  spread (AE-SAM, Jiang, Yang, Zhang and Kwok, ICLR 2023, arXiv:2304.14647).
- :class:`LatePhase`: the base optimizer until a step, SAM from then on (Zhou, Wang,
  Mao, Li and Yan, ICLR 2025, arXiv:2410.10373).

Example (SAM on one step in five, the others at the cost of SGD)::

    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.25, schedule=samopt.schedules.EveryK(5),
                     lr=0.1, momentum=0.9)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from samopt import validation
from samopt.seams import Schedule

__all__ = ["AdaptiveAscent", "EveryK", "LatePhase", "RandomAscent"]


def _steps(name: str, value: object) -> int:
    """``value`` if it is an int >= 0 (a step index), else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (a step index), got {value!r}")
    return value


class EveryK(Schedule):
    """Ascend on steps ``0, k, 2k, ...``: SAM's cost on one step in ``k`` (periodic SAM, as Composer's ``interval``).

    ``k = 1`` is SAM. Composer's method card scales ``rho`` with ``k`` (``rho = 0.5`` at
    ``k = 10`` for ResNet-50 on ImageNet); LookSAM's authors (Liu et al., CVPR 2022)
    report that the plain periodic rule loses accuracy at a fixed ``rho``.

    Args:
        k: the period, an integer >= 1.
    """

    def __init__(self, k: int) -> None:
        self.k = validation.positive_int("k", k)

    def ascend(self, step: int, grad_norm: Callable[[], float]) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"EveryK(k={self.k})"


class RandomAscent(Schedule):
    """Ascend with probability ``p_t`` (SS-SAM / RST, Zhao, Zhang and Hu, arXiv preprint 2022, arXiv:2203.09962).

    ``p_t = p`` (constant), or with ``p_end`` a half cosine from ``p`` at step 0 to
    ``p_end`` at ``total_steps`` (held there after): ``p_t = p_end + (p - p_end) (1 +
    cos(pi t / T)) / 2``. The draw of step ``t`` is a pure function of ``(seed, t)``, so a
    resumed run and every rank draw the same: the policy has no random stream to save.
    ``p = 1`` is SAM and ``p = 0`` the base optimizer, exactly.

    Args:
        p: the probability (at step 0), in [0, 1].
        p_end: the probability at ``total_steps`` (``None``: constant ``p``), in [0, 1].
        total_steps: the length of the cosine, an integer >= 1 (only with ``p_end``).
        seed: the seed of the draws.
    """

    def __init__(self, p: float, *, p_end: float | None = None, total_steps: int | None = None, seed: int = 0) -> None:
        self.p = validation.unit_interval("p", p, include_one=True)
        self.p_end = None if p_end is None else validation.unit_interval("p_end", p_end, include_one=True)
        if (self.p_end is None) != (total_steps is None):
            raise ValueError(
                "p_end and total_steps go together: give both for a cosine from p to p_end, neither for a constant p; "
                f"got p_end={p_end!r}, total_steps={total_steps!r}"
            )
        self.total_steps = validation.positive_int("total_steps", total_steps, allow_none=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def probability(self, step: int) -> float:
        """``p_t`` at update number ``step``."""
        if self.p_end is None or self.total_steps is None:
            return self.p
        t = min(step, self.total_steps) / self.total_steps
        return self.p_end + (self.p - self.p_end) * (1 + math.cos(math.pi * t)) / 2

    def ascend(self, step: int, grad_norm: Callable[[], float]) -> bool:
        # a str seed is hashed with SHA-512 by random.Random: the same draw in every process and Python run
        return random.Random(f"samopt.RandomAscent:{self.seed}:{step}").random() < self.probability(step)

    def __repr__(self) -> str:
        cosine = "" if self.p_end is None else f", p_end={self.p_end}, total_steps={self.total_steps}"
        return f"RandomAscent(p={self.p}{cosine}, seed={self.seed})"


class AdaptiveAscent(Schedule):
    r"""Ascend where the loss looks sharp: AE-SAM (Jiang, Yang, Zhang and Kwok, ICLR 2023, arXiv:2304.14647).

    With ``n = ||g||^2`` of the clean gradient, the running mean and variance are updated
    first, ``mu <- d mu + (1 - d) n`` and ``s2 <- d s2 + (1 - d) (n - mu)^2`` (the first
    step sets ``mu = n``, ``s2 = 0``), and the step ascends when ``n >= mu + c_t sqrt(s2)``,
    with ``c_t`` linear from ``lambda1`` at step 0 to ``lambda2`` at ``total_steps``. If
    ``||g||^2`` were normal, ``c = -1`` would ascend on about 84% of the steps and
    ``c = 1`` on 16%, about half over a run with the defaults; the paper reports about
    half its steps as SAM steps. [inferred] The defaults of ``decay``, ``lambda1`` and
    ``lambda2`` are samopt's choice: the rule is the paper's, these values are not taken from it.

    A non-finite norm (an fp16 overflow, which the step then skips) leaves the statistics
    unchanged. Under ``sync="local"`` each rank keeps statistics of its own gradient.

    Args:
        total_steps: the updates over which ``c_t`` goes from ``lambda1`` to ``lambda2``, an integer >= 1.
        lambda1, lambda2: the threshold's coefficient at the start and the end (finite).
        decay: ``d`` of the moving averages, in [0, 1).
    """

    def __init__(self, total_steps: int, *, lambda1: float = -1.0, lambda2: float = 1.0, decay: float = 0.9) -> None:
        self.total_steps = validation.positive_int("total_steps", total_steps)
        self.lambda1 = validation.finite("lambda1", lambda1)
        self.lambda2 = validation.finite("lambda2", lambda2)
        self.decay = validation.unit_interval("decay", decay, include_one=False)
        self.mean: float | None = None
        self.var = 0.0

    def threshold(self, step: int) -> float:
        """``c_t`` at update number ``step``."""
        t = min(step, self.total_steps) / self.total_steps
        return self.lambda1 + (self.lambda2 - self.lambda1) * t

    def ascend(self, step: int, grad_norm: Callable[[], float]) -> bool:
        n = grad_norm() ** 2
        if not math.isfinite(n):
            return False
        d = self.decay
        if self.mean is None:
            self.mean, self.var = n, 0.0
        else:
            self.mean = d * self.mean + (1 - d) * n
            self.var = d * self.var + (1 - d) * (n - self.mean) ** 2
        return n >= self.mean + self.threshold(step) * math.sqrt(self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var}

    def check_state(self, state: object) -> None:
        ok = isinstance(state, dict) and set(state) == {"mean", "var"}
        if ok:
            mean, var = state["mean"], state["var"]  # type: ignore[index]
            ok = (mean is None or (isinstance(mean, float) and math.isfinite(mean))) and isinstance(var, float)
            ok = ok and math.isfinite(var) and var >= 0
        if not ok:
            raise ValueError(
                "AdaptiveAscent's state must be {'mean': None or a finite float, 'var': a finite float >= 0}, "
                f"got {state!r}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.mean, self.var = state["mean"], state["var"]

    def __repr__(self) -> str:
        return (
            f"AdaptiveAscent(total_steps={self.total_steps}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"decay={self.decay})"
        )


class LatePhase(Schedule):
    """The base optimizer before update number ``start``, SAM from it on (Zhou et al., ICLR 2025, arXiv:2410.10373).

    Zhou et al. switch WRN-16-8 on CIFAR-10 to SAM at epoch 175 of 200 and report
    nearly the generalization of SAM throughout; the cost is ``1 + (T - start) / T``
    forward/backward passes per step. ``start = 0`` is SAM.

    Args:
        start: the first update that ascends, an integer >= 0.
    """

    def __init__(self, start: int) -> None:
        self.start = _steps("start", start)

    def ascend(self, step: int, grad_norm: Callable[[], float]) -> bool:
        return step >= self.start

    def __repr__(self) -> str:
        return f"LatePhase(start={self.start})"
