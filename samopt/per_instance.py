"""Per-instance and m-sharpness SAM: a separate perturbation for every micro-batch of ``m`` examples.

The reference δ-SAM approximates (Zhou et al., EMNLP Findings 2022,
arXiv:2112.08772): per-instance SAM (``m = 1``) minimises the mean over examples of
``max_{||e_i|| <= rho} l_i(w + e_i)``. With micro-batches of ``m`` examples it is the
m-sharpness SAM of Foret et al. (ICLR 2021, arXiv:2010.01412, section 4.1) and
Andriushchenko & Flammarion (ICML 2022, arXiv:2206.06232). Each micro-batch costs
two forward/backward passes of its own, so this is a reference and a baseline for
benchmarks, not a fast optimizer.

Example::

    opt = samopt.PerInstanceSAM(model.parameters(), torch.optim.SGD, rho=0.05, m=1, lr=0.1)

    def closure(index):             # the per-example losses of the examples in ``index`` (None: all)
        xb, yb = (x, y) if index is None else (x[index], y[index])
        return F.cross_entropy(model(xb), yb, reduction="none")

    loss = opt.step(closure)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import distributed as D
from samopt import validation
from samopt.bn import BufferGuard
from samopt.sam import SAM

__all__ = ["PerInstanceSAM"]

IndexClosure = Callable[[Tensor | None], Tensor]


class PerInstanceSAM(torch.optim.Optimizer):
    """SAM with one perturbation per micro-batch of ``m`` examples (``m = 1``: per-instance SAM).

    Foret et al., ICLR 2021, arXiv:2010.01412, section 4.1; Andriushchenko & Flammarion, ICML 2022,
    arXiv:2206.06232.

    The update gradient is ``sum_j (n_j / n) grad L_j(w + e_j)``, where ``L_j`` is the
    mean loss of micro-batch ``j`` (``n_j`` examples, consecutive in the batch) and
    ``e_j = rho * grad L_j(w) / ||grad L_j(w)||`` (ASAM with ``adaptive=True``). The
    closure takes a 1-D index tensor (or ``None`` for the whole batch) and returns
    the per-example losses of those examples, without calling ``backward()``. One
    clean pass over the whole batch updates BatchNorm statistics; the per-micro-batch
    passes leave every buffer as it was (``bn="both"`` included). Gradient scaling
    (``scaler``) is not supported.

    It is a driver of its own over a :class:`samopt.SAM` engine (``opt.engine``), not a
    ``SAM``: the two-pass protocol of SAM would train plain SAM, so the trainer
    integrations, which drive that protocol, refuse it. ``param_groups``, ``state`` and
    the state dict are the engine's.

    Args:
        params, base_optimizer, rho, **kwargs: as :class:`samopt.SAM`.
        m: examples per micro-batch (>= 1).

    After a step, ``.grad`` holds the update gradient until the next ``zero_grad``.

    Example::

        opt = samopt.PerInstanceSAM(model.parameters(), torch.optim.SGD, rho=0.05, m=4, lr=0.1)
        opt.step(lambda idx: F.cross_entropy(model(x if idx is None else x[idx]),
                                             y if idx is None else y[idx], reduction="none"))
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        *,
        m: int = 1,
        **kwargs: Any,
    ) -> None:
        self.m = validation.positive_int("m", m)
        self.engine = SAM(params, base_optimizer, rho, **kwargs)
        super().__init__(self.engine.param_groups, {})
        self.param_groups = self.engine.param_groups
        self.state = self.engine.state
        self._micro_guard = BufferGuard()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self.param_groups = self.engine.param_groups
        self.state = self.engine.state

    @staticmethod
    def _losses(out: object, expected: int | None) -> Tensor:
        if not torch.is_tensor(out) or out.dim() != 1 or (expected is not None and out.shape[0] != expected):
            what = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else type(out).__name__
            want = "(batch,)" if expected is None else f"({expected},)"
            raise ValueError(
                f"the closure must return the per-example losses of the examples asked for, {want}; got {what}"
            )
        return out

    def step(self, closure: IndexClosure | None = None, scaler: None = None) -> Tensor:  # type: ignore[override]
        """One update from the closure ``index -> per-example losses``; returns the mean loss at ``w``."""
        if closure is None or not callable(closure):
            raise ValueError("PerInstanceSAM.step() needs a closure: index tensor (or None) -> per-example losses")
        if scaler is not None:
            raise ValueError("PerInstanceSAM does not support a GradScaler; it is a reference implementation")
        engine = self.engine
        if D.world_size(engine.process_group) > 1:
            raise RuntimeError("PerInstanceSAM is a one-process reference; it does not run on several ranks")
        engine.zero_grad(set_to_none=True)
        with torch.no_grad():
            full = self._losses(closure(None), None)  # the one pass that updates BatchNorm statistics
        n = full.shape[0]
        if n == 0:
            raise ValueError("the closure returned no losses: PerInstanceSAM needs a non-empty batch")
        acc: dict[Tensor, Tensor] = {}
        starts = range(0, n, self.m)
        for j, start in enumerate(starts):
            index = torch.arange(start, min(start + self.m, n), device=full.device)

            def perturbed_backward(index: Tensor = index) -> None:
                with torch.enable_grad(), self._micro_guard:  # whatever bn says: one clean pass counts
                    (self._losses(closure(index), len(index)).mean() * (len(index) / n)).backward()

            engine.zero_grad(set_to_none=True)
            with torch.enable_grad(), self._micro_guard:
                self._losses(closure(index), len(index)).mean().backward()
            if j < len(starts) - 1:
                engine.first_step(zero_grad=True)
                try:
                    perturbed_backward()
                finally:
                    engine.restore()
                for p in [p for group in self.param_groups for p in group["params"] if p.grad is not None]:
                    acc[p] = p.grad if p not in acc else acc[p].add_(p.grad)  # zero_grad drops .grad
                continue
            with engine.perturbed() as ascending:
                if ascending:
                    perturbed_backward()
                for p, g in acc.items():
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return full.detach().mean()
