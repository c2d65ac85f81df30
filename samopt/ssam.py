"""Sparse SAM (Mi et al., NeurIPS 2022, arXiv:2210.05177) as ready-made configurations of :class:`samopt.SAM`.

``SSAMF`` is SAM with a :class:`~samopt.masks.FisherMask`, ``SSAMD`` SAM with a
:class:`~samopt.masks.DynamicSparseMask`; everything else (BatchNorm, mixed
precision, clipping, resume) is the engine's. Both are plain functions returning a
:class:`samopt.SAM`: the keywords of the mask's constructor go to the mask, all the
others to :class:`samopt.SAM`. (The bare name ``SSAM`` is avoided: Stable SAM uses it.)

Example::

    opt = samopt.SSAMF(model.parameters(), torch.optim.SGD, model=model, fisher_data=train_loader,
                       loss_fn=F.cross_entropy, rho=0.1, sparsity=0.5, num_samples=16,
                       update_interval=390, lr=0.05, momentum=0.9)
    opt = samopt.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, drop_rate=0.5,
                       update_interval=390, total_steps=78000, lr=0.05, momentum=0.9)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from samopt.masks import DynamicSparseMask, FisherMask, Mask
from samopt.sam import SAM
from samopt.seams import take_keywords

__all__ = ["SSAMD", "SSAMF"]


def _with_mask(
    mask: type[Mask], params: ParamsT, base_optimizer: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> SAM:
    """``SAM(params, base_optimizer, mask=mask(...))``, each keyword going to the mask if its constructor takes it."""
    return SAM(params, base_optimizer, mask=mask(**take_keywords(mask, kwargs)), **kwargs)


def SSAMF(params: ParamsT, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, **kwargs: Any) -> SAM:
    """SSAM-F: SAM that perturbs only the entries with the largest empirical Fisher information.

    ``SAM(params, base_optimizer, mask=FisherMask(model, fisher_data, loss_fn, ...), ...)``:
    the :class:`~samopt.masks.FisherMask` keywords (``model``, ``fisher_data``,
    ``loss_fn``, ``sparsity``, ``num_samples``, ``update_interval``, ...) build the mask,
    the rest (``rho``, ``adaptive``, ``bn``, ``lr``, ...) the optimizer. Mi et al., NeurIPS 2022,
    arXiv:2210.05177.

    Example::

        opt = samopt.SSAMF(model.parameters(), torch.optim.SGD, model=model, fisher_data=train_loader,
                           loss_fn=F.cross_entropy, rho=0.1, sparsity=0.5, lr=0.05, momentum=0.9)
    """
    return _with_mask(FisherMask, params, base_optimizer, kwargs)


def SSAMD(params: ParamsT, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, **kwargs: Any) -> SAM:
    """SSAM-D: SAM whose perturbation mask evolves by dynamic sparse training (drop and grow).

    ``SAM(params, base_optimizer, mask=DynamicSparseMask(..., total_steps=...), ...)``:
    the :class:`~samopt.masks.DynamicSparseMask` keywords (``sparsity``,
    ``total_steps``, ``drop_rate``, ``drop``, ``grow``, ``update_interval``, ...) build the
    mask, the rest the optimizer. Mi et al., NeurIPS 2022, arXiv:2210.05177.

    Example::

        opt = samopt.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, total_steps=78000, lr=0.05)
    """
    return _with_mask(DynamicSparseMask, params, base_optimizer, kwargs)
