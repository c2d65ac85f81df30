"""Moving parameters to other values and back, bit for bit: the engine's weight swap.

SAM takes a gradient at ``w + e`` and must then apply its update at exactly ``w``.
:class:`WeightSwap` moves a list of parameters to new values and remembers how to
return, in one of two ways per parameter:

- **swap** (the default for a plain parameter that is all of its storage): the new
  values are written into a parameter-sized buffer and the parameter's ``.data`` points
  at it; the parameter's own storage keeps ``w`` untouched and gets its pointer back on
  :meth:`WeightSwap.restore`, so nothing is copied back;
- **in place** (``in_place=True``, and always for views into a shared buffer such as
  FSDP's or DeepSpeed's flat parameters and cuDNN's RNN weights, tensor subclasses and
  empty tensors): ``w`` is copied into the buffer, the new values are written into the
  parameter's storage, and ``w`` is copied back on restore. Use it where something pins
  the parameters' storage (CUDA graphs).

The buffers are kept across moves (one per parameter: the only memory SAM adds), and
autocast's cached low-precision copies of the weights are dropped at every move, so an
enclosing autocast region never computes with stale copies.

Example::

    swap = WeightSwap()
    swap.move(params, lambda idx, out: ...)   # write the new values of params[i], i in idx, into out (or in place)
    ...                                       # forward/backward at the new values
    swap.restore()                            # back at w, bit for bit
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from samopt.functional import buckets

__all__ = ["Fill", "WeightSwap", "owns_storage"]

#: ``fill(idx, out)``: write the new values of ``params[i]`` for ``i`` in ``idx`` into ``out`` (one tensor each),
#: or, with ``out=None``, into the parameters themselves.
Fill = Callable[[list[int], "list[Tensor] | None"], None]


def owns_storage(p: Tensor) -> bool:
    """Whether ``p`` is a plain tensor that is all of its storage, so that its data can be swapped."""
    return (
        type(p) in (torch.nn.Parameter, torch.Tensor)
        and p.numel() > 0
        and p.storage_offset() == 0
        and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    )


class WeightSwap:
    """Moves parameters to new values and back exactly; see the module docstring.

    Args:
        in_place: perturb every parameter in place instead of swapping its storage.
    """

    def __init__(self, *, in_place: bool = False) -> None:
        self.in_place = in_place
        self._buffers: dict[Tensor, Tensor] = {}
        self._swapped: list[tuple[Tensor, Tensor]] = []  # (parameter, its own data at w)
        self._params: list[Tensor] = []  # moved in place ...
        self._backups: list[Tensor] = []  # ... and their copies of w

    @property
    def nbytes(self) -> int:
        """The memory the buffers hold, in bytes (one parameter-sized buffer per parameter moved so far)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def moved(self) -> bool:
        """Whether some parameter is away from the values it had before :meth:`move`."""
        return bool(self._swapped or self._params)

    def buffer(self, p: Tensor) -> Tensor:
        """The parameter-sized buffer of ``p`` (kept across moves; made anew if ``p`` changed)."""
        b = self._buffers.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device or b.stride() != p.stride():
            b = self._buffers[p] = torch.empty_like(p)
        return b

    @torch.no_grad()
    def move(self, params: Sequence[Tensor], fill: Fill) -> None:
        """Move ``params`` to the values ``fill`` writes, recording how to return exactly.

        Parameters are registered before they move, so that :meth:`restore` undoes a
        ``fill`` that fails half-way. Several moves may precede one restore.
        """
        params = list(params)
        swap = [not self.in_place and owns_storage(p) for p in params]
        for moved in (False, True):
            idx = [i for i, s in enumerate(swap) if s == moved]
            if not idx:
                continue
            ps = [params[i] for i in idx]
            bufs = [self.buffer(p) for p in ps]
            if not moved:
                for pb, bb in buckets(ps, bufs):
                    torch._foreach_copy_(bb, pb)
                self._params += ps
                self._backups += bufs
                fill(idx, None)
            else:
                fill(idx, bufs)
                for p, b in zip(ps, bufs, strict=True):
                    self._swapped.append((p, p.data))
                    p.data = b
        torch.clear_autocast_cache()  # an enclosing autocast region would otherwise reuse its casts of the old values

    def replaced(self) -> int:
        """How many swapped parameters had their ``.data`` replaced by something else since :meth:`move`."""
        return sum(p.data_ptr() != self._buffers[p].data_ptr() for p, _ in self._swapped)

    @torch.no_grad()
    def restore(self) -> None:
        """Return every moved parameter to its value before :meth:`move`, bit for bit (a no-op if none moved)."""
        swapped, params, backups = self._swapped, self._params, self._backups
        self._swapped, self._params, self._backups = [], [], []
        for p, w in swapped:
            p.data = w
        for ps, bs in buckets(params, backups):
            torch._foreach_copy_(ps, bs)
        torch.clear_autocast_cache()  # and the copies made at the moved values
