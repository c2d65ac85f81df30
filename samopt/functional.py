"""Pure multi-tensor kernels behind the SAM engine.

Every function here works on plain lists of tensors: no optimizer, module or state.
The engine (:class:`samopt.SAM`) does the bookkeeping and calls these, the way
``torch.optim.SGD.step`` calls ``torch.optim.sgd.sgd``. Each kernel groups its
inputs by device and dtype and runs ``torch._foreach_*`` ops on every group, so
there is no Python loop over parameters on the hot path.
:mod:`samopt.functional_reference` defines the same math one tensor at a time, and
the tests hold these kernels to it.

The perturbation of SAM (Foret et al., "Sharpness-Aware Minimization for
Efficiently Improving Generalization", ICLR 2021, arXiv:2010.01412) and of ASAM
(Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021, arXiv:2102.11600) is written
``e = rho * T^2 g / ||T g||`` with ``T = 1`` for SAM and ``T = |w| + eta``
(elementwise) for ASAM. The norm is global over all tensors, so a caller with
several parameter groups sums the squares of :func:`perturbation_norm` over the
groups and passes each group's ``rho / total`` to :func:`perturb_`.

Example::

    import torch
    from samopt import functional

    params = [torch.randn(3, 2), torch.randn(2)]
    grads = [torch.randn(3, 2), torch.randn(2)]
    norm = functional.perturbation_norm(params, grads)                 # ||g||
    functional.perturb_(params, grads, scale=0.05 / norm)              # w <- w + rho g / ||g||, on the device
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import cast

import torch
from torch import Tensor

__all__ = [
    "CHUNK_NUMEL",
    "buckets",
    "clip_grads_",
    "global_dot",
    "global_norm",
    "perturb_",
    "perturbation_norm",
    "unscale_grads_",
]

#: Bound on the elements one temporary of the adaptive (ASAM) kernels covers, so
#: that they never allocate a second parameter-sized buffer. A single tensor
#: larger than this is processed on its own.
CHUNK_NUMEL = 1 << 22


def buckets(*lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into groups that share device and dtype, keeping order.

    The ``torch._foreach_*`` ops take one device and dtype per call; every kernel here
    runs them once per bucket.
    """
    out: dict[tuple, tuple[list[Tensor], ...]] = defaultdict(lambda: tuple([] for _ in lists))
    for items in zip(*lists, strict=True):
        key = tuple((t.device, t.dtype) for t in items)
        for bucket, t in zip(out[key], items, strict=True):
            bucket.append(t)
    return list(out.values())


def _chunks(*lists: list[Tensor]) -> Iterator[tuple[list[Tensor], ...]]:
    """Consecutive slices of parallel lists holding at most :data:`CHUNK_NUMEL` elements each."""
    start, size = 0, 0
    for i, t in enumerate(lists[0]):
        if size and size + t.numel() > CHUNK_NUMEL:
            yield tuple(lst[start:i] for lst in lists)
            start, size = i, 0
        size += t.numel()
    if start < len(lists[0]):
        yield tuple(lst[start:] for lst in lists)


#: On CPU, contiguous fp32/fp64 tensors of at least this many elements get their squared
#: norm from a BLAS dot product, which reads memory about twice as fast as
#: ``_foreach_norm`` there; smaller ones stay in one ``_foreach_norm`` call, where the
#: per-call overhead of a Python loop would dominate (``benchmarks/norm_kernels.py``).
DOT_MIN_NUMEL = 1 << 15


def _squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norms of same-device, same-dtype ``tensors`` as one 1-D tensor (fp32 or wider)."""
    t0 = tensors[0]
    blas = t0.device.type == "cpu" and t0.dtype in (torch.float32, torch.float64)
    large: list[Tensor] = []
    small: list[Tensor] = []
    for t in tensors:
        (large if blas and t.numel() >= DOT_MIN_NUMEL and t.is_contiguous() else small).append(t)
    out = []
    if large:
        out.append(torch.stack([torch.dot(t.view(-1), t.view(-1)) for t in large]))
    if small:
        acc = torch.promote_types(t0.dtype, torch.float32)
        out.append(torch.stack(torch._foreach_norm(small, 2, dtype=acc)).square())
    return out[0] if len(out) == 1 else torch.cat(out)


def _sqrt_of_sum(parts: list[Tensor], device: torch.device) -> Tensor:
    if not parts:
        return torch.zeros((), dtype=torch.float32, device=device)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    squares = [p.to(device=device, dtype=dtype) for p in parts]
    return (squares[0] if len(squares) == 1 else torch.cat(squares)).sum().sqrt()


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``tensors`` taken together, as one scalar tensor.

    The total norm :func:`torch.nn.utils.clip_grad_norm_` computes (up to rounding),
    accumulated in fp32 or wider, on the device of the first tensor. An empty list
    gives 0.

    Example::

        total = global_norm([p.grad for p in model.parameters() if p.grad is not None])
    """
    if not tensors:
        return torch.zeros(())
    return _sqrt_of_sum([_squared_norms(bucket) for (bucket,) in buckets(tensors)], tensors[0].device)


def perturbation_norm(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """``||m T g||_2`` over all tensors: ``T = 1`` (SAM) or ``T = |w| + eta`` (ASAM); ``m = 1`` by default.

    This is the denominator of the SAM/ASAM perturbation ``e = rho T^2 g / ||T g||``
    (Foret et al. 2021, arXiv:2010.01412; Kwon et al. 2021, arXiv:2102.11600).
    With boolean ``masks`` (one per tensor) it is the norm of the masked direction,
    which Sparse SAM's ``renormalize=True`` divides by (Mi et al., NeurIPS 2022,
    arXiv:2210.05177). The adaptive and masked kernels work in chunks of at most
    :data:`CHUNK_NUMEL` elements.

    Example::

        n = perturbation_norm(params, grads, adaptive=True, eta=0.01)
        n_masked = perturbation_norm(params, grads, masks=[g.abs() > 0.1 for g in grads])
    """
    if not adaptive and masks is None:
        return global_norm(grads)
    if not params:
        return torch.zeros(())
    ms = masks if masks is not None else [None] * len(params)
    parts: list[Tensor] = []
    for bp, bg, bm in _buckets_with_masks(params, grads, ms):
        for cp, cg, cm in _chunks(bp, bg, bm):
            if not adaptive:  # masked SAM
                t = torch._foreach_mul(cg, cm)
            else:
                t = torch._foreach_abs(cp)
                torch._foreach_add_(t, eta)
                torch._foreach_mul_(t, cg)
                if cm[0] is not None:
                    torch._foreach_mul_(t, cm)
            parts.append(_squared_norms(t))
    return _sqrt_of_sum(parts, params[0].device)


def _buckets_with_masks(
    params: Sequence[Tensor], grads: Sequence[Tensor], masks: Sequence[Tensor | None], *more: Sequence[Tensor]
) -> list[tuple[list, ...]]:
    """:func:`buckets` over parameters, gradients, optional masks (all or none ``None``) and more lists."""
    if not masks or masks[0] is None:
        return [(bp, bg, [None] * len(bp), *rest) for bp, bg, *rest in buckets(params, grads, *more)]
    return buckets(params, grads, cast(Sequence[Tensor], masks), *more)


@torch.no_grad()
def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    scale: float | Tensor,
    adaptive: bool = False,
    eta: float = 0.01,
    masks: Sequence[Tensor] | None = None,
    out: Sequence[Tensor] | None = None,
) -> None:
    """Write the perturbed weights ``w + scale * m * T^2 g`` into ``out`` (default: ``params``, in place).

    With ``scale = rho / perturbation_norm(...)`` this is the ascent step of SAM
    (``T = 1``) or element-wise ASAM (``T = |w| + eta``, taken at ``w``); boolean
    ``masks`` (one per tensor) restrict it to the chosen entries, as in Sparse SAM
    (Mi et al., NeurIPS 2022, arXiv:2210.05177). ``scale`` may be a scalar tensor on
    the parameters' device, so that the step never reads it back to the host. The
    direction ``scale * m * T^2 g`` is formed in temporaries of at most
    :data:`CHUNK_NUMEL` elements and added with grouped ``torch._foreach_*`` calls, per
    device and dtype; with ``out`` the weights are only read.

    Example::

        n = perturbation_norm(params, grads)
        scale = torch.where(n > 0, rho / n, 0.0)                    # no perturbation for a zero gradient
        perturb_(params, grads, scale=scale)                        # w <- w + e
        perturb_(params, grads, scale=scale, out=buffers)           # buffers <- w + e, w untouched
        perturb_(params, grads, scale=scale, masks=masks)           # w <- w + m * e
    """
    dests = params if out is None else out
    ms = masks if masks is not None else [None] * len(params)
    for ps, gs, bm, ds in _buckets_with_masks(params, grads, ms, dests):
        s = scale.to(gs[0].device) if isinstance(scale, Tensor) else scale
        for cp, cg, cm, cd in _chunks(ps, gs, bm, ds):
            e = torch._foreach_mul(cg, s)
            if adaptive:
                t = torch._foreach_abs(cp)
                torch._foreach_add_(t, eta)
                torch._foreach_mul_(e, t)
                torch._foreach_mul_(e, t)
            if cm[0] is not None:
                torch._foreach_mul_(e, cm)
            if out is None:
                torch._foreach_add_(cp, e)
            else:
                torch._foreach_add_(e, cp)
                torch._foreach_copy_(cd, e)


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``<a, b>`` over every pair of tensors taken together, accumulated in float64, as one scalar tensor on the
    first tensor's device (0 for empty lists). No grouped dot product exists, so one ``dot`` per pair.

    Example::

        cos = global_dot(g, g_p) / (global_norm(g) * global_norm(g_p))
    """
    if not a:
        return torch.zeros((), dtype=torch.float64)
    device = a[0].device
    return torch.stack(
        [torch.dot(x.reshape(-1).double(), y.reshape(-1).double()).to(device) for x, y in zip(a, b, strict=True)]
    ).sum()


@torch.no_grad()
def clip_grads_(grads: Sequence[Tensor], total_norm: Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place so that their global norm is at most ``max_norm``.

    The arithmetic of :func:`torch.nn.utils.clip_grad_norm_`:
    ``coef = min(1, max_norm / (total_norm + 1e-6))``, applied to every gradient.

    Example::

        total = global_norm(grads)
        clip_grads_(grads, total, max_norm=1.0)
    """
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for (gs,) in buckets(grads):
        torch._foreach_mul_(gs, coef.to(gs[0].device))


@torch.no_grad()
def unscale_grads_(grads: Sequence[Tensor], inv_scale: float | Tensor) -> Tensor:
    """Multiply loss-scaled ``grads`` by ``inv_scale`` in place; return 1.0 if any was inf/NaN.

    The same fused kernel (``torch._amp_foreach_non_finite_check_and_unscale_``) that
    :class:`torch.amp.GradScaler` uses, without touching a scaler's per-optimizer
    state, so SAM can unscale its first-pass gradients and still let the scaler
    unscale the second pass. ``inv_scale`` may be a tensor on the device (no read-back).
    Returns a float32 scalar tensor (0.0 or 1.0).

    Example::

        found_inf = unscale_grads_(grads, 1.0 / scaler.get_scale())
    """
    device = grads[0].device if grads else torch.device("cpu")
    found = torch.zeros((), dtype=torch.float32, device=device)
    for (gs,) in buckets(grads):
        d = gs[0].device
        found_d = torch.zeros((), dtype=torch.float32, device=d)
        inv = torch.as_tensor(inv_scale, dtype=torch.float32, device=d)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found_d, inv)
        found = torch.maximum(found, found_d.to(device))
    return found
