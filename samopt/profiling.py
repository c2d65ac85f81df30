"""What a training step asks of the device: the operators it dispatches and the host synchronisations among them.

A host synchronisation is an operation whose result the Python side must wait for: a
tensor read back as a number (``.item()``, ``float()``, ``bool()``, ``if tensor:``: all
``aten::_local_scalar_dense``) or ``aten::nonzero``, whose output size depends on the
data. On a GPU each one stalls the host until the device has caught up, which costs
most where steps are short. :func:`count_ops` counts them, and every operator, with a
``TorchDispatchMode``, on any device (``benchmarks/step_cost.py --count`` reports them
per optimizer).

Example::

    from samopt.profiling import count_ops

    counted = count_ops(lambda: opt.step(closure))
    counted.syncs, counted.by_op      # e.g. 2, {"aten::_local_scalar_dense": 2}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNCS", "OpCount", "count_ops"]

#: The operators that make the host wait for the device.
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero")


@dataclass(frozen=True)
class OpCount:
    """Operators dispatched by a call, the host synchronisations among them, and those by operator name."""

    ops: int
    syncs: int
    by_op: dict[str, int]


class _Counting(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> OpCount:
    """Run ``fn()`` once and count the operators it dispatches to kernels and the host synchronisations among them.

    Operators reach the count after autograd and autocast, as the kernels see them (the
    backward pass's included); views count too. A synchronisation inside one kernel is
    not seen: on a CPU, boolean-mask indexing counts its elements within ``aten::index``.

    Example::

        count_ops(lambda: torch.ones(3).sum().item()).syncs   # 1
    """
    with _Counting() as counting:
        fn()
    syncs = {name: counting.ops[name] for name in SYNCS if name in counting.ops}
    return OpCount(sum(counting.ops.values()), sum(syncs.values()), syncs)
