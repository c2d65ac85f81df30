"""The engine's three seams, with SAM's behaviour as the base of each.

A SAM update takes the gradient ``g`` at ``w``, moves to ``w + e``, takes the gradient
``g_p`` there, returns to ``w`` and steps the base optimizer. Every method of the SAM
family changes one of three things, so :class:`samopt.SAM` takes one policy for each:

- :class:`Ascent`, how ``e`` is built from ``g``. The base class is SAM (Foret et al.,
  ICLR 2021, arXiv:2010.01412) and, in groups with ``adaptive=True``, element-wise
  ASAM (Kwon et al., ICML 2021, arXiv:2102.11600): ``e = rho T^2 g / ||T g||``.
  Sparse SAM's masks (:mod:`samopt.masks`) are ascent policies, and so are δ-SAM's
  per-example weights (:mod:`samopt.delta`), which change the ascent gradient itself.
- :class:`Descent`, how the update gradient is formed from ``g`` and ``g_p``. The base
  class is SAM's: ``g_p``.
- :class:`Schedule`, whether a step ascends at all. The base class is SAM's: always.
  A step that does not ascend costs one forward/backward: the base optimizer steps
  with ``g``.

A policy keeps its state (EMAs, counters, random streams) in its own attributes and
hands it over through ``state_dict()`` / ``load_state_dict()``, which the optimizer's
:meth:`~samopt.SAM.state_dict` carries, so a resumed run continues exactly. A new
method is a subclass of one of these, passed as ``SAM(..., ascent=..., descent=...,
schedule=...)``; the engine itself does not change. The policies see the parameters
and gradients of each parameter group as lists (``GroupGrads``) and never move the
weights themselves: :meth:`Ascent.perturb` gets a ``move`` function from the engine,
which records how to return.

Example (a schedule that ascends every other step; one forward/backward on the others)::

    class EveryOther(samopt.seams.Schedule):
        def ascend(self, step, grad_norm):
            return step % 2 == 0

    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, schedule=EveryOther(), lr=0.1)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from samopt import functional as kernels
from samopt.swap import Fill

__all__ = [
    "AroundAscent",
    "Ascent",
    "Descent",
    "DirectionAscent",
    "GroupGrads",
    "Move",
    "Part",
    "Pass",
    "Policy",
    "Schedule",
    "per_parameter",
    "perturb_parts",
    "scale_of",
    "take_keywords",
]

#: One parameter group, its parameters that have a gradient and those gradients.
GroupGrads = tuple[dict[str, Any], list[Tensor], list[Tensor]]
#: ``move(params, fill)``: move ``params`` to the values ``fill`` writes (:meth:`samopt.swap.WeightSwap.move`).
Move = Callable[[list[Tensor], Fill], None]
#: A group's parameters and gradients with a bool mask per parameter (``None``: all entries).
Part = tuple[dict[str, Any], list[Tensor], list[Tensor], "list[Tensor] | None"]


@dataclass(frozen=True)
class Pass:
    """Which pass of an update :meth:`samopt.SAM.step` runs, given to a closure that takes one argument.

    ``kind`` is ``"clean"`` (at ``w``; its gradient builds ``e``) or ``"perturbed"`` (at
    ``w + e``; its gradient is the update's); the clean pass should use the first
    ``1 / sub_batches`` of the batch (:class:`~samopt.sub_batch.SubBatchAscent`), which
    :meth:`take` cuts.

    Example::

        def closure(p: samopt.seams.Pass):
            xb, yb = p.take(x, y)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
    """

    kind: str
    sub_batches: int = 1

    def take(self, *batches: Any) -> Any:
        """The first ``len // sub_batches`` rows of each batch (a tensor, or a tuple, list or dict of them, as a
        data loader yields): one result per argument, or the result if one."""
        cut = tuple(_first_rows(b, self.sub_batches) for b in batches)
        return cut[0] if len(cut) == 1 else cut


def _first_rows(batch: Any, parts: int) -> Any:
    """``batch`` with each tensor cut to its first ``len // parts`` rows (other values as they are)."""
    if isinstance(batch, Tensor):
        if len(batch) < parts:
            raise ValueError(
                f"the batch has {len(batch)} rows, fewer than the {parts} sub-batches of the ascent "
                "(SubBatchAscent's m must be at most the batch size)"
            )
        return batch[: len(batch) // parts]
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return {k: _first_rows(v, parts) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_first_rows(v, parts) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_first_rows(v, parts) for v in batch)
    return batch


def per_parameter(tensors: object, shapes: Sequence[Any], what: str) -> bool:
    """Whether ``tensors`` is a ``{parameter index: tensor}`` dict over parameters of ``shapes`` (a policy's saved
    per-parameter state); a tensor of another shape raises ``ValueError`` naming ``what`` and both shapes."""
    if not isinstance(tensors, dict):
        return False
    for i, v in tensors.items():
        if not (isinstance(i, int) and 0 <= i < len(shapes) and torch.is_tensor(v)):
            return False
        if v.shape != shapes[i]:
            raise ValueError(f"{what} for parameter {i} has shape {tuple(v.shape)}, the parameter {tuple(shapes[i])}")
    return True


class Policy:
    """State handling shared by the seams: a stateless policy saves ``{}``."""

    def state_dict(self) -> dict[str, Any]:
        """The policy's state, to be restored by :meth:`load_state_dict`."""
        return {}

    def check_state(self, state: object) -> None:
        """Raise ``ValueError`` unless ``state`` is a :meth:`state_dict` this policy can load."""
        if state != {}:
            raise ValueError(f"{type(self).__name__} keeps no state, but the state_dict holds {state!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned."""
        self.check_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def take_keywords(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove from ``kwargs`` and return the keywords ``cls``'s constructor takes: how a configuration
    (``SSAMF``, ``DeltaSAM``) sends each keyword to its policy or to :class:`~samopt.SAM`."""
    names = inspect.signature(cls).parameters
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def perturb_parts(parts: Sequence[Part], norm: Tensor, move: Move) -> None:
    """Move each part to ``w + rho m T^2 g / norm`` (its group's ``rho``, ``adaptive``, ``eta``; mask ``m``).

    ``norm`` stays on the device: a zero norm (a zero gradient) gives no perturbation, and
    a non-finite one a non-finite ``w + e``, which the engine never keeps (it returns to
    ``w`` by copy or swap, and skips the update on the device).
    """
    for group, params, grads, masks in parts:
        if not params or group["rho"] == 0:
            continue
        kw = {"scale": scale_of(group["rho"], norm), "adaptive": group["adaptive"], "eta": group["eta"]}

        def fill(idx: list[int], out: list[Tensor] | None, params=params, grads=grads, masks=masks, kw=kw) -> None:
            chosen = None if masks is None else [masks[i] for i in idx]
            kernels.perturb_([params[i] for i in idx], [grads[i] for i in idx], masks=chosen, out=out, **kw)

        move(params, fill)


def scale_of(rho: float, norm: Tensor) -> Tensor:
    """``rho / norm``, or 0 for a zero ``norm``, computed on ``norm``'s device (no read-back)."""
    return torch.where(norm > 0, rho / norm, 0.0)


class Ascent(Policy):
    """How the perturbation ``e`` is built from the gradient at ``w``: SAM and ASAM (this base class).

    ``e = rho T^2 g / ||T g||`` with ``T = 1`` (SAM, Foret et al., ICLR 2021,
    arXiv:2010.01412) or ``T = |w| + eta`` in groups with ``adaptive=True`` (ASAM,
    Kwon et al., ICML 2021, arXiv:2102.11600); each group's ``rho``, ``adaptive``,
    ``eta``; the norm is global over every group.

    The engine calls, in each ``first_step``: :meth:`norm` (whose finiteness decides
    an overflow skip, on the device), then, if the step ascends, :meth:`perturb`; after
    every update :meth:`advance`. :meth:`bind` is called once with every parameter.
    """

    #: The clean pass's share of the batch is ``1 / sub_batches`` (:class:`Pass`); 1: the whole batch.
    sub_batches = 1

    def bind(self, params: list[Tensor], owner: object, group: Any = None, *, sharded: bool = False) -> None:
        """Attach to the optimizer ``owner`` and all its ``params`` (``group``: the ranks to agree with;
        ``sharded``: FSDP-sharded parameters, of which each rank holds a shard)."""

    def norm(self, groups: Sequence[GroupGrads]) -> Tensor:
        """The denominator ``||T g||`` over every group (of this rank's shards, under FSDP)."""
        norms = [kernels.perturbation_norm(ps, gs, adaptive=g["adaptive"], eta=g["eta"]) for g, ps, gs in groups if ps]
        return kernels.global_norm(norms)

    def perturb(self, groups: Sequence[GroupGrads], norm: Tensor, move: Move) -> None:
        """Move the parameters to ``w + e`` through ``move``, given ``norm = ||T g||``, a scalar tensor on the
        device (a zero gradient gives no perturbation; the engine never reads ``norm`` back to the host, and a
        policy should not either)."""
        perturb_parts([(g, ps, gs, None) for g, ps, gs in groups], norm, move)

    def advance(self) -> None:
        """One step was taken (with ``check="deferred"``, also one whose update was skipped on the device)."""

    def reads_gradient(self) -> bool:
        """Whether this step's :meth:`perturb` reads the clean gradient for more than ``e`` (a mask update): the
        engine then checks it on the host first, so that a non-finite one skips the step before it is read."""
        return False

    @property
    def skips_clean_grads(self) -> bool:
        """Whether :meth:`clean_params` may leave parameters out: then every step must ascend and the update must
        not read ``g`` (the engine refuses a schedule or a descent that needs the clean gradient beside it)."""
        return False

    def clean_params(self) -> list[Tensor] | None:
        """The parameters whose gradient the next clean pass must compute (``None``: every one).

        :meth:`samopt.SAM.first_pass` computes no gradient for the others (``requires_grad``
        off for the clean pass, as the official Efficient SAM code, dydjw9/Efficient_SAM
        ``utils/Esam.py``, does per tensor), so their weight-gradient products are not run.
        """
        return None

    def density(self) -> float:
        """The fraction of parameter entries the perturbation reaches."""
        return 1.0

    def check_state(self, state: object) -> None:
        if isinstance(state, dict) and "masks" in state:
            raise ValueError(
                "the state_dict's mask entry does not match this optimizer, which has none; "
                "construct the optimizer with the same mask= kind"
            )
        super().check_state(state)

    def state_from_format1(self, meta: dict[str, Any]) -> dict[str, Any]:
        """This policy's state from the ``"samopt"`` entry of a state_dict of format 1 (before the seams),
        which kept a mask's state under ``"mask"``."""
        return meta.get("mask", {})


class DirectionAscent(Ascent):
    """An ascent along a direction ``d`` built from ``g`` and per-parameter state (an EMA of the gradient):
    ``e = rho T^2 d / ||T d||``, SAM's scaling applied to ``d``. The base of VaSSO's and Friendly-SAM's ascents.

    A subclass implements :meth:`direction` (``d`` from ``g`` and the state, without changing
    it) and :meth:`commit` (the state after this step). The engine checks the clean
    gradient on the host before :meth:`perturb` (:meth:`reads_gradient`), so that an
    overflow never reaches the state; a step skipped for one leaves it as it was. The
    state is one tensor per parameter that has had a gradient, in :meth:`state_dict`.
    """

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}  # index of the parameter -> its state tensor
        self._index: dict[Tensor, int] = {}
        self._shapes: list[Any] = []
        self._pending: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]] = []

    def bind(self, params: list[Tensor], owner: object, group: Any = None, *, sharded: bool = False) -> None:
        if sharded:
            raise ValueError(f"{type(self).__name__} over FSDP-sharded parameters is not supported; use DDP")
        self._index = {p: i for i, p in enumerate(params)}
        self._shapes = [p.shape for p in params]

    def direction(self, index: list[int], grads: list[Tensor]) -> list[Tensor]:
        """The direction ``d`` for the parameters numbered ``index`` with clean gradients ``grads`` (new tensors)."""
        raise NotImplementedError

    def commit(self, index: list[int], grads: list[Tensor], directions: list[Tensor]) -> None:
        """Update the state of the parameters numbered ``index`` after a step that ascends along ``directions``."""
        raise NotImplementedError

    def norm(self, groups: Sequence[GroupGrads]) -> Tensor:
        self._pending = []
        for group, params, grads in groups:
            index = [self._index[p] for p in params]
            self._pending.append((group, params, grads, self.direction(index, grads) if params else []))
        norms = [
            kernels.perturbation_norm(ps, ds, adaptive=g["adaptive"], eta=g["eta"])
            for g, ps, _, ds in self._pending
            if ps
        ]
        return kernels.global_norm(norms)

    def perturb(self, groups: Sequence[GroupGrads], norm: Tensor, move: Move) -> None:
        pending, self._pending = self._pending, []
        for _, params, grads, directions in pending:
            if params:
                self.commit([self._index[p] for p in params], grads, directions)
        perturb_parts([(g, ps, ds, None) for g, ps, _, ds in pending], norm, move)

    def reads_gradient(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": dict(self.buffers)}

    def check_state(self, state: object) -> None:
        ok = isinstance(state, dict) and set(state) == {"buffers"}
        ok = ok and per_parameter(state["buffers"], self._shapes, f"{type(self).__name__}'s state")  # type: ignore[index]
        if not ok:
            raise ValueError(
                f"{type(self).__name__}'s state must be {{'buffers': {{parameter index: tensor}}}}, got {state!r}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.buffers = {i: v.clone() for i, v in state["buffers"].items()}


class AroundAscent(Ascent):
    """An ascent policy around another one, ``inner``, which builds the perturbation: every engine hook and the
    state go to ``inner``; a subclass overrides what it adds (δ-SAM's weights, a sub-batch's share of the batch)."""

    def __init__(self, inner: Ascent | None = None) -> None:
        self.inner = Ascent() if inner is None else inner

    def bind(self, params: list[Tensor], owner: object, group: Any = None, *, sharded: bool = False) -> None:
        self.inner.bind(params, owner, group, sharded=sharded)

    def norm(self, groups: Sequence[GroupGrads]) -> Tensor:
        return self.inner.norm(groups)

    def perturb(self, groups: Sequence[GroupGrads], norm: Tensor, move: Move) -> None:
        self.inner.perturb(groups, norm, move)

    def advance(self) -> None:
        self.inner.advance()

    def reads_gradient(self) -> bool:
        return self.inner.reads_gradient()

    @property
    def skips_clean_grads(self) -> bool:
        return self.inner.skips_clean_grads

    def clean_params(self) -> list[Tensor] | None:
        return self.inner.clean_params()

    def density(self) -> float:
        return self.inner.density()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def check_state(self, state: object) -> None:
        self.inner.check_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def state_from_format1(self, meta: dict[str, Any]) -> dict[str, Any]:
        return self.inner.state_from_format1(meta)


class Descent(Policy):
    """How the update gradient is formed from ``g`` (at ``w``) and ``g_p`` (at ``w + e``): ``g_p`` (SAM).

    A subclass that needs ``g`` sets :attr:`needs_clean` and gets a copy of it. The
    gradients reach it unscaled (after a GradScaler's ``unscale_``) and averaged over
    the ranks, with the parameters they belong to, in the same order.
    """

    #: Whether :meth:`combine` needs the gradient at ``w`` (the engine then keeps a copy of it).
    needs_clean = False
    #: Whether :meth:`after_update` moves the weights after the base optimizer's step, which the device cannot
    #: skip: the engine then reads the overflow flag back before the update (one read-back a step).
    updates_after = False

    def bind(self, params: list[Tensor], owner: object, *, sharded: bool = False) -> None:
        """Attach to the optimizer ``owner`` and all its ``params`` (``sharded``: FSDP shards, of which each rank
        holds a part, so a norm or dot product over them needs every rank's)."""

    def combine(self, params: list[Tensor], clean: list[Tensor] | None, grads: list[Tensor]) -> None:
        """Turn ``grads`` (``g_p`` of ``params``; ``clean``: ``g``, the same order) into the update gradient, in
        place."""

    def without_ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """Turn ``grads`` (``g`` of ``params``) into the update gradient of a step that did not ascend, in place."""

    def after_update(self) -> None:
        """Called after the base optimizer's step of each applied update (with :attr:`updates_after`)."""


class Schedule(Policy):
    """Whether a step ascends: always (SAM)."""

    def ascend(self, step: int, grad_norm: Callable[[], float]) -> bool:
        """Whether step number ``step`` (0-based; see :meth:`samopt.SAM.second_step` on skipped ones) runs the
        perturbed pass.

        ``grad_norm()`` gives ``||g||`` of the clean gradient (computed on demand).
        """
        return True
