"""Keep module buffers (BatchNorm running statistics and the like) exactly as they were.

SAM runs a second forward pass at the perturbed weights ``w + e``. In training
mode that pass would update BatchNorm running statistics a second time, from
activations of weights the model never takes. :class:`BufferGuard` undoes that
without needing the model: while it is active, a global forward pre-hook
(``torch.nn.modules.module.register_module_forward_pre_hook``) snapshots, the first
time a module runs, the buffers of it and of all its submodules that are in training
mode (the whole subtree at once, so a ``torch.compile``'d model, whose inner modules
run no hooks, is covered too), and :meth:`BufferGuard.restore` copies them back in
place. This covers
``running_mean``/``running_var``, ``num_batches_tracked`` (so layers with
``momentum=None``, a cumulative average, stay exact too), and any other buffer a
training-mode forward mutates. Modules in eval mode do not change their buffers
and are not copied.

The hook is process-global while active: a module of another model that runs a
training-mode forward inside the window is restored as well.

Example::

    guard = BufferGuard()
    with guard:                      # or guard.start() ... guard.restore()
        model(x_perturbed).sum().backward()
    # every BatchNorm buffer is bit-identical to its value before the block
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from samopt.functional import buckets

__all__ = ["BufferGuard"]


class BufferGuard:
    """Snapshot the buffers of modules (and their submodules) that run in training mode while active;
    restore them on exit."""

    def __init__(self) -> None:
        self._saved: dict[nn.Module, list[tuple[str, torch.Tensor]]] = {}
        self._buffers: list[torch.Tensor] = []  # every buffer snapshotted ...
        self._copies: list[torch.Tensor] = []  # ... and its copy
        self._handle: RemovableHandle | None = None

    @property
    def active(self) -> bool:
        """Whether the guard is currently recording."""
        return self._handle is not None

    def start(self) -> None:
        """Begin recording. Raises ``RuntimeError`` if already active."""
        if self._handle is not None:
            raise RuntimeError("BufferGuard.start(): the guard is already active")
        self._saved, self._buffers, self._copies = {}, [], []
        self._handle = nn.modules.module.register_module_forward_pre_hook(self._snapshot)

    def _snapshot(self, module: nn.Module, args: object) -> None:
        if module in self._saved:
            return
        # The whole subtree at once: inside a torch.compile'd module the submodules' own
        # hooks never fire, but the call of the outer module still does.
        new: list[torch.Tensor] = []
        for m in module.modules():
            if m not in self._saved:
                own = [(name, b) for name, b in m._buffers.items() if b is not None] if m.training else []
                self._saved[m] = own
                new += [b for _, b in own]
        for (bufs,) in buckets(new):  # one grouped copy per device and dtype
            self._buffers += bufs
            self._copies += torch._foreach_clone(bufs)  # buffers carry no autograd history

    @torch.no_grad()
    def restore(self, only: torch.Tensor | bool | None = None) -> None:
        """Stop recording and copy every snapshot back into its original tensor (a no-op if inactive).

        ``only``: restore only if this flag (a bool tensor, read on its device) is set, and
        keep the new values otherwise; ``None``: always.
        """
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if only is None:
            for bufs, copies in buckets(self._buffers, self._copies):
                torch._foreach_copy_(bufs, copies)
        elif only is not False:
            for buf, copy in zip(self._buffers, self._copies, strict=True):
                buf.copy_(torch.where(torch.as_tensor(only, device=buf.device), copy, buf))
        for module, saved in self._saved.items():
            for name, buf in saved:
                module._buffers[name] = buf  # a module that replaced its buffer gets the original back
        self._saved, self._buffers, self._copies = {}, [], []

    def __enter__(self) -> BufferGuard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()
