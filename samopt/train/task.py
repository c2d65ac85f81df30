"""What a training run trains: the contract between the training loop and its tasks.

A task provider (:mod:`samopt.train.vision` for image classification,
:mod:`samopt.train.glue` for GLUE) builds a :class:`Task` from a run's settings; the
loop (:mod:`samopt.train.loop`) trains any :class:`Task`. Batches come from
:class:`Loader`\\ s, whose batches are a function of the seed, the epoch and the batch
index, so a run can continue mid-epoch.

Example::

    task = vision.build_task(cfg, torch.device("cpu"))
    for x, y in task.train.epoch(0):
        loss = task.loss_fn(task.model(task.prepare(x)), y)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from samopt.train.optimizers import Amp

__all__ = ["Loader", "Task"]


class Loader(Protocol):
    """Batches ``(inputs, targets)`` of an epoch, from batch ``start`` on; ``len()`` is the batches per epoch."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class Task:
    """What a run trains: the model, its batches, its loss and how it is evaluated.

    ``evaluate(model, amp)`` returns named metrics (evaluation loss included);
    ``score`` names the one that summarises a run (higher is better); ``classification``
    says whether the training accuracy (argmax of the outputs) is meaningful;
    ``fisher`` is SSAM-F's stream of training batches (``None`` for other optimizers).
    """

    model: nn.Module
    train: Loader
    fisher: Loader | None
    loss_fn: Callable[..., Tensor]
    evaluate: Callable[[nn.Module, Amp], dict[str, float]]
    score: str
    classification: bool = True
    prepare: Callable[[Tensor], Tensor] = _identity  # e.g. to channels_last
