"""The collectives samopt runs under :mod:`torch.distributed`: gradient averaging and identical random state.

All of them are no-ops in a single process (``torch.distributed`` not
initialised, or a group of one rank), so the engine calls them unconditionally.
Tensors are reduced on their own device (gloo: CPU, nccl: CUDA), one flat buffer
per device and dtype.

Example::

    from samopt import distributed as D

    D.all_reduce_([p.grad for p in model.parameters()], op="mean")   # as DDP averages gradients
    D.broadcast_generator_(generator)                                  # rank 0's state everywhere
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from samopt import validation

__all__ = ["REDUCE_OPS", "all_reduce_", "broadcast_generator_", "rank", "world_size"]

#: Allowed values of :func:`all_reduce_`'s ``op``.
REDUCE_OPS = ("mean", "sum", "max")


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (the default group for ``None``); 1 when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def all_reduce_(tensors: Sequence[Tensor], op: str = "mean", group: dist.ProcessGroup | None = None) -> None:
    """Replace each tensor by its ``"mean"``, ``"sum"`` or ``"max"`` over the ranks of ``group``, in place.

    One collective per (device, dtype) bucket. Every rank must pass tensors of the
    same shapes in the same order.
    """
    validation.choice("op", op, REDUCE_OPS)
    n = world_size(group)
    if n == 1 or not tensors:
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        buckets[(t.device, t.dtype)].append(t)
    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=reduce_op, group=group)
        if op == "mean":
            flat.div_(n)
        torch._foreach_copy_(ts, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in ts]), ts, strict=True)])


def broadcast_generator_(generator: torch.Generator, group: dist.ProcessGroup | None = None) -> None:
    """Give ``generator`` the state it has on the group's first rank, so every rank draws the same numbers."""
    if world_size(group) == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    state = generator.get_state().to(device)
    dist.broadcast(state, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    generator.set_state(state.cpu())
