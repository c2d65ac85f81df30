"""Runs launched by ``torchrun``: the process group, each rank's device, and its share of every batch.

``torchrun --nproc_per_node N samopt train ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment; :func:`setup` joins them in
a process group (gloo on the CPU, nccl on CUDA, one GPU per local rank). Every rank
builds the same global batches (they are functions of the seed, epoch and batch
index, :mod:`samopt.train.loader`) and :class:`Shard` keeps rank ``r``'s contiguous
``1/N`` of each. A run's position is a global batch index, so a checkpoint
continues on any number of ranks that divides the batch size.

Example::

    ranks, device = setup("auto")
    train = Shard(loader, ranks)          # rank r's B/N examples of each global batch of B
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Ranks", "Shard", "setup"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's ranks (``world == 1``: an ordinary single-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank writes files and prints (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {text!r}") from None


def setup(device: str) -> tuple[Ranks, str]:
    """Join the process group ``torchrun`` describes in the environment; returns the ranks and the device to use.

    Without ``WORLD_SIZE`` (or with 1) nothing is initialised and ``device`` is
    returned unchanged. Otherwise ``device`` ``"auto"`` or ``"cuda"`` becomes
    ``cuda:LOCAL_RANK`` where CUDA is available (nccl), and the CPU uses gloo.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world == 1:
        return Ranks(), device
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.startswith("cuda:"):
        raise ValueError(
            f"device {device!r}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda or auto"
        )
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        # the group's communication threads start with Ctrl-C and SIGTERM blocked, so the kernel hands them to
        # the Python thread (which finishes the step and saves), never to a thread inside a blocking receive
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
        try:
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return Ranks(rank, world), device


class Shard:
    """Rank ``r``'s contiguous ``1/N`` of each batch of ``loader`` (the whole batch in one process)."""

    def __init__(self, loader, ranks: Ranks) -> None:
        self.loader, self.ranks = loader, ranks

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        r, n = self.ranks.rank, self.ranks.world
        for x, y in self.loader.epoch(epoch, start):
            if len(y) % n:
                raise ValueError(f"a batch of {len(y)} examples cannot be split over {n} ranks: make it a multiple")
            b = len(y) // n
            yield x[r * b : (r + 1) * b], y[r * b : (r + 1) * b]
