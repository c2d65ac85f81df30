"""Ascent on a sub-batch: the perturbation from the gradient of a fraction of the batch, the update from all of it.

Bahri, Mobahi and Tay ("Sharpness-Aware Minimization Improves Language Model
Generalization", ACL 2022, arXiv:2110.08529) compute SAM's ascent gradient on ``1/m``
of the batch and report about 1.25x the base optimizer's cost at ``m = 4``: the clean
pass costs ``1/m`` of a pass. :meth:`samopt.SAM.step` tells the closure which pass it
runs with a :class:`~samopt.seams.Pass`; the closure cuts the batch with ``p.take``.

Example::

    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, ascent=SubBatchAscent(4), lr=0.1)

    def closure(p):                       # p.kind: "clean" (a quarter of the batch) or "perturbed" (all of it)
        xb, yb = p.take(x, y)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    opt.step(closure)
"""

from __future__ import annotations

from samopt import validation
from samopt.seams import AroundAscent, Ascent

__all__ = ["SubBatchAscent"]


class SubBatchAscent(AroundAscent):
    """The ascent of ``inner`` (SAM's, or a mask's) from the gradient of the first ``1 / m`` of the batch.

    Bahri, Mobahi and Tay, ACL 2022, arXiv:2110.08529.

    Only the closure can cut the batch: with :meth:`samopt.SAM.step` it must take the
    :class:`~samopt.seams.Pass` argument; with the two-phase API, run the clean pass on
    ``1 / m`` of the batch yourself. ``m = 1`` is ``inner``. The steps always ascend (a
    step that did not would update with the sub-batch's gradient), so the optimizer
    refuses a schedule beside it.

    Args:
        m: the number of parts, an integer >= 1 (no larger than the batch).
        inner: the ascent policy that builds ``e`` (``None``: SAM's).
    """

    def __init__(self, m: int, inner: Ascent | None = None) -> None:
        self.sub_batches = validation.positive_int("m", m)
        if inner is not None and not isinstance(inner, Ascent):
            raise TypeError(f"inner must be a samopt.seams.Ascent or None, got {inner!r}")
        if isinstance(inner, SubBatchAscent):
            raise TypeError("inner is already a SubBatchAscent: give its inner policy and one m")
        super().__init__(inner)

    def __repr__(self) -> str:
        return f"SubBatchAscent(m={self.sub_batches}, inner={self.inner!r})"
