"""The perturbation math of :mod:`samopt.functional`, written plainly: one tensor at a time, in float64.

No multi-tensor ops, device buckets or chunks: this module is the definition the fast
kernels are tested against, as facebookresearch/schedule_free keeps a ``*_reference.py``
beside each fast optimizer. SAM (Foret et al., ICLR 2021, arXiv:2010.01412) and ASAM
(Kwon et al., ICML 2021, arXiv:2102.11600) perturb by ``e = rho m T^2 g / ||m T g||``
with ``T = 1`` (SAM) or ``T = |w| + eta`` (ASAM) and a mask ``m`` (Sparse SAM, Mi et
al., NeurIPS 2022, arXiv:2210.05177; 1 without one). For tests and for reading, not for
training.

Example::

    from samopt import functional_reference as ref

    norm = ref.perturbation_norm(params, grads, adaptive=True)
    perturbed = ref.perturb(params, grads, scale=rho / norm, adaptive=True)   # new tensors, params untouched
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

__all__ = ["clip_coefficient", "global_norm", "perturb", "perturbation_norm"]


def _scale(p: Tensor, adaptive: bool, eta: float) -> Tensor | float:
    """``T``: ``|w| + eta`` for ASAM, 1 for SAM."""
    return p.double().abs() + eta if adaptive else 1.0


def global_norm(tensors: Sequence[Tensor]) -> float:
    """``sqrt(sum_i ||t_i||^2)``."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def perturbation_norm(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    masks: Sequence[Tensor] | None = None,
) -> float:
    """``||m T g||`` over all tensors."""
    total = 0.0
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        d = _scale(p, adaptive, eta) * g.double()
        if masks is not None:
            d = d * masks[i]
        total += float(d.square().sum())
    return math.sqrt(total)


def perturb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    scale: float,
    adaptive: bool = False,
    eta: float = 0.01,
    masks: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """``w + scale m T^2 g`` for each tensor (``T`` taken at ``w``), as new tensors of the parameters' dtypes."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        e = scale * _scale(p, adaptive, eta) ** 2 * g.double()
        if masks is not None:
            e = e * masks[i]
        out.append((p.double() + e).to(p.dtype))
    return out


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor :func:`torch.nn.utils.clip_grad_norm_` scales every gradient by: ``min(1, max / (total + 1e-6))``."""
    return min(1.0, max_norm / (total_norm + 1e-6))
