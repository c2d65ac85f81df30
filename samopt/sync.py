"""How the engine's gradients and norms agree across ranks and FSDP shards.

Under :mod:`torch.distributed` a SAM step has two questions to settle: which gradient
the perturbation is built from (``sync="global"``: the one averaged over every rank,
so ``e`` is the same everywhere and N ranks compute what one process computes on the
concatenated batch, as the official Sparse SAM code does; ``sync="local"``: each
rank's own, m-sharpness with ``m`` the per-rank batch, as SAM ran on TPUs, Foret et
al., ICLR 2021), and who averages the gradients (DDP, FSDP or a trainer, or samopt
itself with ``average_grads=True`` for a plain model on each rank).
:class:`GradientSync` holds those choices and runs the collectives they need; every
method is a no-op in one process.

FSDP (``fully_shard``, parameters as sharded ``DTensor``): each rank holds a shard of
every gradient, so global norms are all-reduced over the shards (:meth:`GradientSync.over_shards`).

Example::

    sync = GradientSync(params, sync="local", ddp=model)
    with sync.clean_pass():              # DDP's no_sync(): each rank keeps its own first-pass gradient
        loss_fn(model(x), y).backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from samopt import distributed as D
from samopt import validation

#: A flag on the host or on the device.
F = TypeVar("F", bool, Tensor)

__all__ = ["SYNC_MODES", "GradientSync"]

#: Allowed values of ``sync``.
SYNC_MODES = ("global", "local")


class GradientSync:
    """The gradient synchronisation of one optimizer over ``params``; see the module docstring.

    Args:
        params: every parameter of the optimizer.
        sync: ``"global"`` or ``"local"``.
        ddp: the :class:`~torch.nn.parallel.DistributedDataParallel` wrapper of the model, if any.
        average_grads: samopt averages the gradients itself (a plain model on each rank).
        process_group: the ranks to average over (``None``: ``ddp``'s group, else the default group).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        sync: str = "global",
        ddp: DistributedDataParallel | None = None,
        average_grads: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.mode = validation.choice("sync", sync, SYNC_MODES)
        if ddp is not None and not isinstance(ddp, DistributedDataParallel):
            raise TypeError(
                f"ddp must be the torch.nn.parallel.DistributedDataParallel wrapper of the model or None, got {ddp!r}"
            )
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}")
        self.average_grads = validation.boolean("average_grads", average_grads)
        if ddp is not None and self.average_grads:
            raise ValueError("give ddp= (DDP averages the gradients) or average_grads=True (samopt does), not both")
        if process_group is None and ddp is not None:
            process_group = ddp.process_group
        self.ddp, self.process_group = ddp, process_group
        params = list(params)
        self._device = params[0].device if params else torch.device("cpu")  # for collectives without gradients
        self.shard_group = self._fsdp_group(params, process_group)

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP-sharded ``DTensor``\\ s (each rank holds a shard of each)."""
        return self.shard_group is not None

    def _fsdp_group(self, params: list[Tensor], group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
        shards = [p for p in params if isinstance(p, DTensor)]
        if not shards:
            return None
        if len(shards) != len(params) or any(
            p.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in p.placements) for p in shards
        ):
            raise ValueError(
                "SAM over DTensor parameters needs all of them sharded on one 1-D device mesh (FSDP's "
                "fully_shard over the whole model); replicated, hybrid or partly sharded layouts are not supported"
            )
        if self.mode != "global":
            raise ValueError(
                f"sync={self.mode!r} needs each rank's own full gradient, which FSDP does not keep (it "
                "reduce-scatters in backward); use sync='global' with FSDP"
            )
        if self.average_grads:
            raise ValueError("average_grads=True with FSDP-sharded parameters: FSDP averages (reduce-scatters) them")
        return group if group is not None else shards[0].device_mesh.get_group()

    @property
    def world(self) -> int:
        """The number of ranks in the process group (1 in one process)."""
        return D.world_size(self.process_group)

    @contextlib.contextmanager
    def clean_pass(self, unsynced: bool = False) -> Iterator[None]:
        """The context the clean pass (forward **and** backward) runs in: DDP's ``no_sync()`` with ``ddp=`` and
        ``sync="local"`` or ``unsynced`` (a pass that leaves tensors without a gradient, which DDP's reducer
        would wait for), nothing otherwise."""
        quiet = self.ddp is not None and (self.mode == "local" or unsynced)
        with self.ddp.no_sync() if quiet else contextlib.nullcontext():  # type: ignore[union-attr]
            yield

    def ascent_gradients(self, grads: list[Tensor], unsynced: bool = False) -> None:
        """Make ``grads`` (the clean pass's) the ones the perturbation is built from: averaged for ``"global"``
        (if samopt averages, or the pass was ``unsynced``), each rank's own for ``"local"`` (refused on several
        ranks when nothing shows that the clean pass was not averaged)."""
        if self.mode == "global":
            self.average(grads, force=unsynced)
        elif self.ddp is None and not self.average_grads and self.world > 1:
            raise ValueError(
                "sync='local' on several ranks needs ddp= (the DistributedDataParallel wrapper, whose first pass "
                "samopt runs under no_sync()) or average_grads=True (a plain model on each rank)"
            )

    def average(self, grads: list[Tensor], force: bool = False) -> None:
        """Average ``grads`` over the ranks with ``average_grads=True`` (or ``force``); a no-op in one process.

        Every rank must hold gradients of the same parameters: that is checked first
        (one small all-reduce), so a rank with other ones fails on every rank instead of
        leaving the others waiting.
        """
        if not (self.average_grads or force) or self.world == 1:
            return
        numel = sum(g.numel() for g in grads)
        device = grads[0].device if grads else self._device
        bounds = torch.tensor([len(grads), numel, -len(grads), -numel], dtype=torch.float64, device=device)
        D.all_reduce_([bounds], "max", self.process_group)
        if bounds[0] != -bounds[2] or bounds[1] != -bounds[3]:
            raise RuntimeError(
                "the ranks hold gradients of different parameters (a parameter unused on some ranks?): "
                f"this rank has {len(grads)} gradients ({numel} entries), others between {int(-bounds[2])} and "
                f"{int(bounds[0])}; every rank's closure must produce gradients for the same parameters"
            )
        D.all_reduce_(grads, "mean", self.process_group)

    def over_shards(self, norm: Tensor) -> Tensor:
        """``norm`` of this rank's tensors as the norm over every rank's shards (unchanged without FSDP)."""
        if self.shard_group is None:
            return norm
        sq = norm.double().square().reshape(1)
        D.all_reduce_([sq], "sum", self.shard_group)
        return sq.sqrt().reshape(()).to(norm.dtype)

    def any_rank(self, flag: F) -> F:
        """Whether ``flag`` (a bool, or a bool tensor kept on its device) is set on any rank, in ``"local"`` mode on
        several ranks (where each rank's clean gradient is its own, so an overflow on one must skip the step on
        all); ``flag`` itself otherwise."""
        if self.mode != "local" or self.world == 1:
            return flag
        bad = torch.as_tensor(flag, dtype=torch.float32, device=self._device).clone()
        D.all_reduce_([bad], "max", self.process_group)
        return bool(bad.item()) if isinstance(flag, bool) else bad.to(flag.device) > 0
