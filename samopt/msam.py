"""Momentum-SAM (Becker, Altrock and Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", arXiv preprint 2024, arXiv:2401.12033; official code MarlonBecker/MSAM): SAM's perturbation along
the momentum, at the cost of the base optimizer.

The weights rest at the perturbed point ``w~ = w - rho v / ||v||`` between updates, with
``v`` the base optimizer's momentum (SGD's ``momentum_buffer``, Adam's and AdamW's first
moment ``exp_avg``; the norm over every parameter). The gradient of the one
forward/backward of a step is taken there; the update returns to ``w`` exactly, steps
the base optimizer with that gradient and moves to the new ``w~``. The true weights
``w`` are what to evaluate and save: :meth:`MSAM.true_weights` puts them in place.
Its ``rho`` is an order larger than SAM's: the official README's commands use 3 with SGD
and with AdamW, where they use 0.2 for SAM.

Example::

    opt = samopt.MSAM(model.parameters(), torch.optim.SGD, rho=3.0, lr=0.1, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with opt.true_weights():
        evaluate(model)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "checkpoint.pt")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import functional as kernels
from samopt import validation
from samopt.sam import step_within_hooks
from samopt.seams import scale_of
from samopt.swap import WeightSwap

__all__ = ["MSAM", "momentum_direction_reference"]

#: The state entry of each base optimizer that holds its momentum.
MOMENTUM = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg"}
STATE_FORMAT = 1


def momentum_direction_reference(weights: Tensor, momentum: Tensor, rho: float) -> Tensor:
    """``w - rho v / ||v||`` on one flat vector (``w`` if ``v = 0``), written plainly, for tests."""
    norm = momentum.double().norm()
    if norm == 0:
        return weights.clone()
    return (weights.double() - rho * momentum.double() / norm).to(weights.dtype)


class MSAM(torch.optim.Optimizer):
    """Momentum-SAM over SGD (with momentum), Adam or AdamW: one forward/backward per step.

    Use it as any torch optimizer (``loss.backward(); opt.step()``, a GradScaler's
    ``scaler.step(opt)``, clipping before the step, LR schedulers on it); evaluate and
    save inside :meth:`true_weights`. ``rho = 0`` is the base optimizer, bit for bit. Becker, Altrock and
    Risse, arXiv preprint 2024, arXiv:2401.12033; official code MarlonBecker/MSAM. The module's docstring
    shows a training loop.

    Args:
        params: parameters or groups.
        base_optimizer: ``torch.optim.SGD`` (``momentum > 0``), ``Adam`` or ``AdamW`` (the class).
        rho: the distance of ``w~`` from ``w``, >= 0.
        perturb_in_place: move the weights in their own storage (for CUDA graphs) instead of swapping it.
        **base_kwargs: the base optimizer's arguments.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 3.0,
        *,
        perturb_in_place: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if base_optimizer not in MOMENTUM:
            names = ", ".join(f"torch.optim.{c.__name__}" for c in MOMENTUM)
            raise TypeError(f"MSAM perturbs along the base optimizer's momentum: base_optimizer must be {names}; "
                            f"got {base_optimizer!r}")  # fmt: skip
        if base_optimizer is torch.optim.SGD and not base_kwargs.get("momentum"):
            raise ValueError("MSAM over SGD needs momentum > 0 (its direction is the momentum buffer); got momentum "
                             f"{base_kwargs.get('momentum', 0)!r}")  # fmt: skip
        self.rho = validation.nonnegative("rho", rho)
        self.perturb_in_place = validation.boolean("perturb_in_place", perturb_in_place)
        super().__init__(params, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults
        self._key = MOMENTUM[base_optimizer]
        self._swap = WeightSwap(in_place=self.perturb_in_place)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def _perturb(self) -> None:
        """Move from ``w`` to ``w - rho v / ||v||`` (nowhere before the base optimizer has a momentum)."""
        pairs = [(p, self.state[p][self._key]) for p in self._params() if self._key in self.state.get(p, {})]
        if not pairs or self.rho == 0:
            return
        params, moments = [p for p, _ in pairs], [v for _, v in pairs]
        scale = -scale_of(self.rho, kernels.global_norm(moments))  # 0 for a zero momentum, on the device

        def fill(idx: list[int], out: list[Tensor] | None) -> None:
            chosen = [params[i] for i in idx], [moments[i] for i in idx]
            kernels.perturb_(*chosen, scale=scale, out=out)

        self._swap.move(params, fill)

    @contextlib.contextmanager
    def true_weights(self) -> Iterator[None]:
        """The true weights ``w`` in place inside the block (to evaluate or save the model); ``w~`` after it."""
        moved = self._swap.moved
        self._swap.restore()
        try:
            yield
        finally:
            if moved:
                self._perturb()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update with the gradient in ``.grad`` (taken at ``w~``): back to ``w``, the base optimizer's
        step, then to the new ``w~``. The closure, if given, computes that gradient first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._swap.restore()
        step_within_hooks(self, self.base_optimizer)
        self._perturb()
        return loss

    step.hooked = True  # type: ignore[attr-defined]  # torch must not wrap it: the hooks run once, in the base's

    def first_step(self, *args: Any, **kwargs: Any) -> None:
        """Not for MSAM, which has one pass: ``loss.backward()`` then :meth:`step`."""
        raise TypeError("MSAM has one forward/backward per step and no two-phase API: loss.backward(), then step()")

    second_step = perturbed = first_step

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``"msam"`` entry (format, base optimizer, rho)."""
        state = self.base_optimizer.state_dict()
        state["msam"] = {"format": STATE_FORMAT, "base": type(self.base_optimizer).__name__, "rho": self.rho}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` and move to the ``w~`` it implies: load the model's true weights first (into a
        model whose MSAM has not stepped, or inside :meth:`true_weights`)."""
        meta = state_dict.get("msam") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise ValueError(f"not an MSAM state_dict of format {STATE_FORMAT} (it has no matching 'msam' entry)")
        if meta.get("base") != type(self.base_optimizer).__name__:
            raise ValueError(f"the state_dict is of an MSAM over {meta.get('base')}, this one is over "
                             f"{type(self.base_optimizer).__name__}")  # fmt: skip
        base = {k: v for k, v in state_dict.items() if k != "msam"}
        validation.optimizer_state(self.base_optimizer, base)
        self._swap.restore()
        self.base_optimizer.load_state_dict(base)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._perturb()

    def __repr__(self) -> str:
        return f"MSAM(rho={self.rho}, base_optimizer={self.base_optimizer!r})"
