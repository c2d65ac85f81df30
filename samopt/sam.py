"""The SAM engine: two passes, perturb and restore, BatchNorm, mixed precision, state.

Every samopt method is a configuration of :class:`SAM`; the math it applies lives in
:mod:`samopt.functional` and the BatchNorm bookkeeping in :mod:`samopt.bn`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from samopt import _validate
from samopt import distributed as D
from samopt import functional as F
from samopt.bn import BufferGuard
from samopt.masks import Mask

__all__ = ["SAM", "NonFiniteGradientError"]

#: Hyperparameters SAM keeps in every parameter group, beside the base optimizer's.
GROUP_KEYS = ("rho", "adaptive", "eta")
#: Allowed values of ``bn``.
BN_MODES = ("first", "both")
#: Allowed values of ``sync``.
SYNC_MODES = ("global", "local")
#: Version of the ``"samopt"`` entry of :meth:`SAM.state_dict`.
STATE_FORMAT = 1

Closure = Callable[[], Any]


class NonFiniteGradientError(RuntimeError, FloatingPointError):
    """A non-finite gradient (or δ-SAM norm estimate) without a GradScaler to skip the step; the weights are at ``w``.

    A ``RuntimeError`` (as before it had a name) and a ``FloatingPointError`` (so
    ``samopt train`` reports it as a diverged run, not a crash).
    """


def _check_group(index: int, group: dict[str, Any], params: list[Tensor]) -> None:
    """Check SAM's keys of a parameter group, and the base optimizer's ``lr`` and ``weight_decay``.

    ``params`` are the group's tensors (a saved group holds only their indices).
    """
    for key in GROUP_KEYS:
        if key not in group:
            raise ValueError(f"param_groups[{index}] has no {key!r}: a SAM parameter group needs {GROUP_KEYS}")
    _validate.nonnegative(f"param_groups[{index}]['rho']", group["rho"])
    _validate.boolean(f"param_groups[{index}]['adaptive']", group["adaptive"])
    _validate.nonnegative(f"param_groups[{index}]['eta']", group["eta"])
    for key in ("lr", "weight_decay"):
        if key in group:
            _validate.rate(f"param_groups[{index}][{key!r}]", group[key], params)
    if group["adaptive"] and any(p.is_complex() for p in params):
        raise ValueError(
            f"param_groups[{index}] holds complex parameters, which ASAM (adaptive=True) does not support "
            "(its scale |w| + eta is not defined for them); put them in a group with adaptive=False"
        )


def _check_params(index: int, params: list[Any], groups: list[dict[str, Any]]) -> None:
    """Refuse parameters SAM cannot move to ``w + e`` and back: on the meta device, or listed twice."""
    seen: dict[int, int] = {}
    for j, p in enumerate(params):
        if not isinstance(p, Tensor):
            continue  # torch.optim.Optimizer names it
        if p.device.type == "meta":
            raise ValueError(
                f"param_groups[{index}] parameter {j} (shape {tuple(p.shape)}) is on the meta device, without "
                "values to perturb: materialise the model first (e.g. model.to_empty(device=...), then load or "
                "initialise its weights) and build the optimizer after"
            )
        if id(p) in seen:
            raise ValueError(
                f"param_groups[{index}] lists a parameter (shape {tuple(p.shape)}) twice, at positions {seen[id(p)]} "
                f"and {j}: list each parameter once (a repeated one would be perturbed twice and not return to w)"
            )
        seen[id(p)] = j
    for k, group in enumerate(groups):
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(
                    f"param_groups[{index}] and param_groups[{k}] both hold a parameter (shape {tuple(p.shape)}): "
                    "each parameter belongs to one group"
                )


def _name(optimizer: torch.optim.Optimizer) -> str:
    """The qualified class name of ``optimizer``, as recorded in a state_dict."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _enabled(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None


def _owns_storage(p: Tensor) -> bool:
    """Whether ``p`` is a plain tensor that is all of its storage, so its data can be swapped.

    Not so for views into a flat buffer (FSDP with ``use_orig_params``, DeepSpeed,
    cuDNN's flattened RNN weights), tensor subclasses (``DTensor``, FSDP's
    ``FlatParameter``) and empty tensors: those are perturbed in place.
    """
    return (
        type(p) in (torch.nn.Parameter, torch.Tensor)
        and p.numel() > 0
        and p.storage_offset() == 0
        and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    )


#: One group's parameters, gradients and (for a partly masked part) their bool masks.
_Part = tuple[dict[str, Any], list[Tensor], list[Tensor], "list[Tensor] | None"]


@dataclass
class _Pending:
    """What :meth:`SAM.first_step` did, for :meth:`SAM.second_step` to undo."""

    swapped: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (parameter, its own data at w)
    params: list[Tensor] = field(default_factory=list)  # perturbed in place ...
    backups: list[Tensor] = field(default_factory=list)  # ... and their copies of w
    scaler: torch.amp.GradScaler | None = None
    skip: bool = False


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any torch optimizer.

    Each update takes the gradient ``g`` at the weights ``w``, moves to
    ``w + e`` with ``e = rho * g / ||g||`` (SAM, Foret et al., ICLR 2021,
    arXiv:2010.01412) or ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta``
    elementwise (ASAM, Kwon et al., ICML 2021, arXiv:2102.11600; ``adaptive=True``),
    takes the gradient there, returns to ``w`` exactly and lets the base optimizer
    step with that second gradient. The norm is global over every parameter that
    has a gradient; parameters without ``.grad`` are skipped; a zero gradient gives
    no perturbation.

    Args:
        params: parameters or parameter groups, as for any torch optimizer. A group
            may carry its own ``rho``, ``adaptive`` and ``eta`` (e.g. no ASAM scaling
            for biases and norm layers) and the base optimizer's own keys.
        base_optimizer: the optimizer **class** that applies the update; it is built
            over the same parameter groups with ``**base_kwargs``. ``opt.param_groups``
            is its list, so an LR scheduler on either object drives both.
        rho: perturbation radius (>= 0; 0 gives exactly the base optimizer). ASAM
            usually wants a larger radius (0.5 to 2) than SAM (0.05 to 0.1).
        adaptive: ASAM instead of SAM.
        eta: ASAM's offset in ``T = |w| + eta``.
        bn: ``"first"`` (default): buffers of modules that run in training mode
            (BatchNorm running statistics, ``num_batches_tracked``) are updated by
            the clean pass only; the perturbed pass leaves them bit-identical.
            ``"both"``: both passes update them, as the official Sparse SAM code does.
        max_grad_norm: if set, clip the descent gradient (the one taken at ``w + e``)
            to this global L2 norm before the base step, with the arithmetic of
            :func:`torch.nn.utils.clip_grad_norm_`. Clipping the ascent gradient would
            do nothing: ``e`` is normalised to radius ``rho`` whatever its length.
        mask: a :mod:`samopt.masks` mask (Sparse SAM): only its live entries are
            perturbed, ``e = m * rho * T^2 g / ||T g||`` with the full gradient's
            norm (or ``||m T g||`` if the mask has ``renormalize=True``). Parameters
            whose mask is all off are not touched at all. ``None``: dense SAM.
        perturb_in_place: how the parameters get to ``w + e``. ``False`` (default):
            ``w + e`` is written into a buffer and each parameter's ``.data`` points
            at it during the perturbed pass; the parameter's own storage keeps ``w``
            untouched and is pointed back at afterwards (no copy back). ``True``:
            ``w`` is copied to the buffer and ``w + e`` written into the parameter's
            own storage, then ``w`` is copied back; use it where something pins the
            parameters' storage (CUDA graphs, e.g. ``torch.compile(mode="reduce-overhead")``).
            Parameters that are views into a shared buffer (FSDP, DeepSpeed, cuDNN
            RNN weights) or tensor subclasses (``DTensor``) are always perturbed in place.
            Both ways return to ``w`` bit for bit.
        sync: what the perturbation is built from when training on several ranks
            (``torch.distributed``, e.g. under ``torchrun``); no effect in one process.
            ``"global"`` (default): the gradient averaged over all ranks, so ``e`` is
            the same everywhere and N ranks compute what one process computes on the
            concatenated batch (as the official Sparse SAM code does: its first pass
            runs through DDP). ``"local"``: each rank's own gradient, no gradient
            all-reduce in the first pass: m-sharpness with ``m`` the per-rank batch, as SAM
            (Foret et al.) ran on TPUs. The descent gradients are averaged in both.
        ddp: the :class:`~torch.nn.parallel.DistributedDataParallel` wrapper of the model,
            if there is one: it averages the gradients in backward, and :meth:`step`
            runs the first pass (forward and backward) under its ``no_sync()`` when
            ``sync="local"`` (two-phase API: run it under :meth:`first_pass`).
        average_grads: ``True`` for a plain (unwrapped) model on each rank: samopt
            averages the gradients itself, after the first pass (``"global"``) and
            after the second. ``False`` (default): gradients are averaged by whatever
            wraps the model (DDP, FSDP, DeepSpeed, a trainer) or not at all.
            ``sync="local"`` on several ranks needs ``ddp=`` or ``average_grads=True``:
            otherwise samopt cannot tell that the first pass is not averaged.
        process_group: the ranks to average over and agree on masks with (``None``:
            ``ddp``'s group, else the default group).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    FSDP (``torch.distributed.fsdp.fully_shard``, parameters as sharded ``DTensor``):
    construct SAM after sharding; FSDP reduce-scatters the gradients, samopt perturbs
    each rank's shard in place and takes the norm over all shards (one all-reduce of a
    scalar), so ``e`` is exactly one process's. Only ``sync="global"`` and no mask
    (a global top-k would need every shard's scores); not with :class:`DeltaSAM`.

    Closure API (torch semantics: the closure computes the loss, calls
    ``backward()`` and returns the loss; samopt zeroes gradients before each call
    and returns the loss at ``w``)::

        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)

    Two-phase API (gradients at ``w`` in ``.grad`` for ``first_step``, at ``w + e``
    for ``second_step``)::

        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    Gradient accumulation: loop over the micro-batches inside the closure (or before
    each of ``first_step``/``second_step``); both passes must see the same
    micro-batches, and each micro-batch loss is divided by their number.

    Mixed precision: bf16 autocast needs nothing. For fp16 with a
    :class:`torch.amp.GradScaler`, the closure calls ``scaler.scale(loss).backward()``
    and you pass the scaler to samopt instead of calling ``scaler.step``::

        def closure():
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        opt.step(closure, scaler=scaler)      # or first_step(scaler=...)/second_step(scaler=...)
        scaler.update()

    samopt unscales each pass's gradients; an inf/NaN in either pass skips the whole
    update, leaves the weights exactly at ``w`` and makes ``scaler.update()`` lower
    the scale, as :class:`~torch.amp.GradScaler` does for a plain optimizer. Without
    a scaler, a non-finite gradient raises ``RuntimeError`` naming the pass, with the
    weights left at ``w``.

    Several ranks (``torchrun``; see ``sync`` and ``ddp``)::

        model = DistributedDataParallel(model)
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, sync="local", ddp=model, lr=0.1)
        opt.step(closure)                     # pass 1 under model.no_sync(), pass 2 averaged by DDP

    Masks are computed identically on every rank (see :mod:`samopt.masks`).

    Memory: one parameter-sized buffer beyond the base optimizer's state (holding
    ``w + e``, or a copy of ``w`` with ``perturb_in_place=True``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        bn: str = "first",
        max_grad_norm: float | None = None,
        *,
        mask: Mask | None = None,
        perturb_in_place: bool = False,
        sync: str = "global",
        ddp: DistributedDataParallel | None = None,
        average_grads: bool = False,
        process_group: dist.ProcessGroup | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD "
                f"(the class, not an instance; its arguments go to SAM(..., **base_kwargs)); got {base_optimizer!r}"
            )
        if issubclass(base_optimizer, SAM):
            raise TypeError(
                f"base_optimizer must be a plain optimizer, not a samopt optimizer ({base_optimizer.__name__})"
            )
        clash = [k for k in GROUP_KEYS if k in inspect.signature(base_optimizer).parameters]
        if clash:
            raise TypeError(
                f"base_optimizer {base_optimizer.__name__} has its own {clash} hyperparameter(s), "
                f"which SAM's parameter groups use for {GROUP_KEYS}; pick another base optimizer"
            )
        defaults = {
            "rho": _validate.nonnegative("rho", rho),
            "adaptive": _validate.boolean("adaptive", adaptive),
            "eta": _validate.nonnegative("eta", eta),
        }
        self.bn = _validate.choice("bn", bn, BN_MODES)
        self.max_grad_norm = _validate.positive_or_none("max_grad_norm", max_grad_norm)
        self.perturb_in_place = _validate.boolean("perturb_in_place", perturb_in_place)
        self.sync = _validate.choice("sync", sync, SYNC_MODES)
        if ddp is not None and not isinstance(ddp, DistributedDataParallel):
            raise TypeError(
                f"ddp must be the torch.nn.parallel.DistributedDataParallel wrapper of the model or None, got {ddp!r}"
            )
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}")
        self.average_grads = _validate.boolean("average_grads", average_grads)
        if ddp is not None and self.average_grads:
            raise ValueError("give ddp= (DDP averages the gradients) or average_grads=True (samopt does), not both")
        if process_group is None and ddp is not None:
            process_group = ddp.process_group
        self.ddp, self.process_group = ddp, process_group
        if mask is not None and not isinstance(mask, Mask):
            raise TypeError(f"mask must be a samopt.masks.Mask (e.g. RandomMask(sparsity=0.5)) or None, got {mask!r}")
        self.mask = mask
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **defaults}
        for i, group in enumerate(self.param_groups):
            _check_group(i, group, group["params"])  # SAM's keys, and the base optimizer's lr and weight_decay
        self._buffers: dict[Tensor, Tensor] = {}
        self._guard = BufferGuard() if self.bn == "first" else None
        self._pending: _Pending | None = None
        self._shard_group = self._fsdp_group(process_group)
        self._bind_mask()

    def _fsdp_group(self, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
        """The group the shards of FSDP-sharded (``DTensor``) parameters live on; ``None`` without them."""
        params = self._all_params()
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
        if self.sync != "global":
            raise ValueError(
                f"sync={self.sync!r} needs each rank's own full gradient, which FSDP does not keep (it "
                "reduce-scatters in backward); use sync='global' with FSDP"
            )
        if self.average_grads:
            raise ValueError("average_grads=True with FSDP-sharded parameters: FSDP averages (reduce-scatters) them")
        if self.mask is not None:
            raise ValueError(
                "masks over FSDP-sharded parameters are not supported (the top-k needs every shard's scores); "
                "use dense SAM with FSDP, or DDP for Sparse SAM"
            )
        return process_group if process_group is not None else shards[0].device_mesh.get_group()

    def _over_shards(self, norm: Tensor) -> Tensor:
        """``norm`` of this rank's tensors as the norm over every rank's shards (unchanged without FSDP)."""
        if self._shard_group is None:
            return norm
        sq = norm.double().square().reshape(1)
        D.all_reduce_([sq], "sum", self._shard_group)
        return sq.sqrt().reshape(()).to(norm.dtype)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and the base optimizer (SAM keys default to the constructor's).

        Refuses a parameter listed twice (in the group or in another one) and
        parameters on the meta device, which torch's optimizers accept.
        """
        params = param_group["params"]
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # torch.optim refuses sets with its own message
            param_group["params"] = list(params)
        _check_params(len(self.param_groups), param_group["params"], self.param_groups)
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key in GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        index = len(self.param_groups)
        _check_group(index, {**self.base_optimizer.defaults, **param_group}, param_group["params"])
        self.base_optimizer.add_param_group(param_group)
        self._bind_mask()

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _bind_mask(self) -> None:
        """(Re)attach the mask to every parameter; a new group makes it recompute at the next step."""
        if self.mask is not None:
            params = self._all_params()
            self.mask.bind(params, owner=self, group=self.process_group)
            self._mask_index = {p: i for i, p in enumerate(params)}

    def mask_density(self) -> float:
        """Fraction of parameter entries the perturbation reaches (1.0 without a mask)."""
        return 1.0 if self.mask is None else self.mask.density()

    # ------------------------------------------------------------------ passes

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """The context the clean pass (forward **and** backward) runs in: DDP's ``no_sync()``
        with ``sync="local"`` and ``ddp=``, nothing otherwise. :meth:`step` uses it; with the
        two-phase API, wrap the code before :meth:`first_step` in it."""
        with self.ddp.no_sync() if self.ddp is not None and self.sync == "local" else contextlib.nullcontext():
            yield

    def _average(self, grads: list[Tensor], force: bool = False) -> None:
        """Average ``grads`` over the ranks with ``average_grads=True`` (or ``force``); a no-op in one process.

        Every rank must hold gradients of the same parameters: that is checked first
        (one small all-reduce), so a rank with other ones fails on every rank instead of
        leaving the others waiting.
        """
        if not (self.average_grads or force) or D.world_size(self.process_group) == 1:
            return
        numel = sum(g.numel() for g in grads)
        dev = grads[0].device if grads else self._all_params()[0].device
        bounds = torch.tensor([len(grads), numel, -len(grads), -numel], dtype=torch.float64, device=dev)
        D.all_reduce_([bounds], "max", self.process_group)
        if bounds[0] != -bounds[2] or bounds[1] != -bounds[3]:
            raise RuntimeError(
                "the ranks hold gradients of different parameters (a parameter unused on some ranks?): "
                f"this rank has {len(grads)} gradients ({numel} entries), others between {int(-bounds[2])} and "
                f"{int(bounds[0])}; every rank's closure must produce gradients for the same parameters"
            )
        D.all_reduce_(grads, "mean", self.process_group)

    def _collect(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """Each group with its parameters that have a gradient, and those gradients (this rank's
        shards of FSDP-sharded ones)."""
        out = []
        for i, group in enumerate(self.param_groups):
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(
                        f"param_groups[{i}] has a sparse gradient; SAM needs dense gradients "
                        "(e.g. nn.Embedding(..., sparse=False))"
                    )
                params.append(p.to_local() if isinstance(p, DTensor) else p)
                grads.append(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
            out.append((group, params, grads))
        return out

    def _buffer(self, p: Tensor) -> Tensor:
        """The parameter-sized buffer of ``p`` (kept across steps; remade if ``p`` changed)."""
        b = self._buffers.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device or b.stride() != p.stride():
            b = self._buffers[p] = torch.empty_like(p)
        return b

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None) -> None:
        """Move from ``w`` to ``w + e`` using the gradients at ``w`` in ``.grad``.

        Args:
            zero_grad: set the gradients to ``None`` afterwards, ready for the
                perturbed backward.
            scaler: the :class:`~torch.amp.GradScaler` whose scaled loss produced
                the gradients; they are unscaled here. If they hold an inf/NaN the
                weights stay at ``w``, the gradients are kept (so the overflow
                reaches the scaler in :meth:`second_step`) and the update is skipped.
        """
        if self._pending is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are already at w + e; "
                "call second_step() to finish the update or restore() to undo it"
            )
        scaler = _enabled(scaler)
        collected = self._collect()
        for i, (group, _, _) in enumerate(collected):
            _check_group(i, group, group["params"])
        grads = [g for _, _, gs in collected for g in gs]
        if self.sync == "global":
            self._average(grads)
        elif self.ddp is None and not self.average_grads and D.world_size(self.process_group) > 1:
            raise ValueError(
                "sync='local' on several ranks needs ddp= (the DistributedDataParallel wrapper, whose first pass "
                "samopt runs under no_sync()) or average_grads=True (a plain model on each rank)"
            )
        if not grads:
            raise RuntimeError(
                "no parameter has a gradient in the clean pass (at w): the closure, or your code "
                "before first_step(), must call loss.backward()"
            )
        found_inf = False
        if scaler is not None:
            if any(g.dtype == torch.float16 for g in grads):
                raise ValueError("Attempting to unscale FP16 gradients: keep fp32 parameters under fp16 autocast")
            found_inf = bool(F.unscale_grads_(grads, 1.0 / scaler.get_scale()).item())
        norms = [F.perturbation_norm(ps, gs, adaptive=g["adaptive"], eta=g["eta"]) for g, ps, gs in collected if ps]
        total = self._over_shards(F.global_norm(norms)).item()
        if self.sync == "local" and D.world_size(self.process_group) > 1:
            # each rank has its own gradient: skip (or raise) on all ranks if any overflowed, or they deadlock
            bad = torch.tensor(float(found_inf or not math.isfinite(total)), device=grads[0].device)
            D.all_reduce_([bad], "max", self.process_group)
            if bad.item() and math.isfinite(total):
                found_inf, total = True, math.inf
        pending = _Pending(scaler=scaler)
        if found_inf or not math.isfinite(total):
            if scaler is None:
                raise NonFiniteGradientError(
                    f"non-finite gradient in the clean pass (at w): gradient norm {total}; the weights are "
                    "unchanged. For fp16 pass a GradScaler (opt.step(closure, scaler=scaler))"
                )
            pending.skip = True
        self._pending = pending
        if not pending.skip:
            try:
                parts = self._apply_mask(collected)
                if self.mask is not None and self.mask.renormalize and total > 0:
                    norms = [
                        F.perturbation_norm(ps, gs, adaptive=g["adaptive"], eta=g["eta"], masks=ms)
                        for g, ps, gs, ms in parts
                        if ps
                    ]
                    total = F.global_norm(norms).item()
                if total > 0:
                    self._perturb(parts, total, pending)
            except BaseException:
                self.restore()
                raise
        if self._guard is not None:
            self._guard.start()
        if zero_grad and not pending.skip:
            self.zero_grad(set_to_none=True)

    def _apply_mask(self, collected: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> list[_Part]:
        """Update the mask if due and split each group into unmasked and masked parts (all-off ones dropped)."""
        if self.mask is None:
            return [(group, params, grads, None) for group, params, grads in collected]
        self.mask.maybe_update([p.grad for p in self._all_params()])
        parts: list[_Part] = []
        for group, params, grads in collected:
            full: tuple[list[Tensor], list[Tensor]] = ([], [])
            some: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
            for p, g in zip(params, grads, strict=True):
                i = self._mask_index[p]
                live = self.mask.live[i]
                if live == p.numel():
                    full[0].append(p)
                    full[1].append(g)
                elif live:
                    some[0].append(p)
                    some[1].append(g)
                    some[2].append(self.mask.mask_of(i))
            parts += [(group, *full, None), (group, *some)]
        return parts

    def _perturb(self, parts: list[_Part], total: float, pending: _Pending) -> None:
        """Move each part to ``w + e`` (``total`` is the global ``||T g||``), recording how to return."""
        for group, params, grads, masks in parts:
            if not params or group["rho"] == 0:
                continue
            kw = {"scale": group["rho"] / total, "adaptive": group["adaptive"], "eta": group["eta"]}

            def fill(idx: list[int], out: list[Tensor] | None, params=params, grads=grads, masks=masks, kw=kw) -> None:
                sel_masks = None if masks is None else [masks[i] for i in idx]
                F.perturb_([params[i] for i in idx], [grads[i] for i in idx], masks=sel_masks, out=out, **kw)

            self._move(params, fill, pending)

    def _move(
        self, params: list[Tensor], fill: Callable[[list[int], list[Tensor] | None], None], pending: _Pending
    ) -> None:
        """Move ``params`` to new values, recording in ``pending`` how to return exactly.

        ``fill(idx, out)`` writes the new values of ``params[i]`` for ``i`` in ``idx``:
        into ``out`` (one buffer each; the parameters are only read, then pointed at
        the buffers) or, with ``out=None``, into the parameters themselves (after
        their values were copied to the buffers). Parameters that do not own their
        storage, or all with ``perturb_in_place=True``, take the second way.
        """
        in_place = self.perturb_in_place or self._shard_group is not None  # FSDP gathers from its own buffer
        swap = [not in_place and _owns_storage(p) for p in params]
        for moved in (False, True):
            idx = [i for i, s in enumerate(swap) if s == moved]
            if not idx:
                continue
            ps = [params[i] for i in idx]
            bufs = [self._buffer(p) for p in ps]
            if not moved:
                for pb, bb in F._buckets(ps, bufs):
                    torch._foreach_copy_(bb, pb)
                pending.params += ps  # registered before they move, so restore() can always undo
                pending.backups += bufs
                fill(idx, None)
            else:
                fill(idx, bufs)
                for p, b in zip(ps, bufs, strict=True):
                    pending.swapped.append((p, p.data))
                    p.data = b
        torch.clear_autocast_cache()  # an enclosing autocast region would otherwise reuse its casts of the old values

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`first_step`: weights (and buffers, with ``bn="first"``) back to their values at ``w``.

        Needed only when the perturbed pass of the two-phase API fails and no
        :meth:`second_step` follows; :meth:`step` does it itself. A no-op when the
        weights are not perturbed.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for p, w in pending.swapped:
            p.data = w
        for ps, bs in F._buckets(pending.params, pending.backups):
            torch._foreach_copy_(ps, bs)
        torch.clear_autocast_cache()  # and the copies made at w + e (restore() runs before each update, too)
        if self._guard is not None:
            self._guard.restore()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None) -> None:
        """Return to ``w`` exactly and step the base optimizer with the gradients at ``w + e``.

        Args:
            zero_grad: set the gradients to ``None`` after the update.
            scaler: the same :class:`~torch.amp.GradScaler` given to :meth:`first_step`.
                The gradients are unscaled through ``scaler.unscale_`` (so call only
                ``scaler.update()`` afterwards, not ``scaler.step``); an inf/NaN in
                this or the first pass skips the update.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("second_step() called without a preceding first_step(): the weights are not perturbed")
        moved = [p for p, _ in pending.swapped if p.data_ptr() != self._buffers[p].data_ptr()]
        self.restore()
        if moved:
            raise RuntimeError(
                f"{len(moved)} parameter(s) had their .data replaced by something else during the perturbed pass "
                "(a wrapper that manages parameter storage?); they are back at w and no update was applied. "
                "Construct SAM with perturb_in_place=True"
            )
        scaler = _enabled(scaler)
        if scaler is not pending.scaler:
            raise ValueError(
                "second_step() must get the same scaler as first_step() "
                f"(first_step: {pending.scaler!r}, second_step: {scaler!r}); the update was not applied"
            )
        grads = [g for _, _, gs in self._collect() for g in gs]
        # a skipped step in local mode kept each rank's own first-pass gradients: averaging them spreads the
        # overflow to every rank's scaler, so all lower their scale alike
        self._average(grads, force=pending.skip and self.sync == "local")
        if not grads:
            raise RuntimeError(
                "no parameter has a gradient in the perturbed pass (at w + e): call loss.backward() "
                "between first_step() and second_step()"
            )
        if scaler is not None:
            scaler.unscale_(self)
        total = self._over_shards(F.global_norm(grads))
        total_f = total.item()
        if pending.skip or not math.isfinite(total_f):
            if scaler is None:
                raise NonFiniteGradientError(
                    f"non-finite gradient in the perturbed pass (at w + e): gradient norm {total_f}; the weights "
                    "are restored to w and not updated. For fp16 pass a GradScaler (opt.step(closure, scaler=scaler))"
                )
        else:
            if self.max_grad_norm is not None:
                F.clip_grads_(grads, total, self.max_grad_norm)
            self.base_optimizer.step()
            if self.mask is not None:
                self.mask.advance()
        # An LR scheduler attached to this object watches step(); the two-phase API never calls it.
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Closure | None = None, scaler: torch.amp.GradScaler | None = None) -> Any:
        """One SAM update: the closure at ``w``, :meth:`first_step`, the closure at ``w + e``, :meth:`second_step`.

        Gradients are zeroed before each closure call. Returns the closure's loss at
        ``w``. If the closure raises at ``w + e`` (``KeyboardInterrupt`` included) the
        weights and buffers are restored to ``w`` before the exception propagates.
        With a ``scaler`` whose first pass overflows, the second closure call is
        skipped along with the update.
        """
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that computes the loss, calls loss.backward() and returns the loss: "
                "opt.step(closure); or use opt.first_step() / opt.second_step()"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if self._pending is not None:
            raise RuntimeError("step() called between first_step() and second_step(); call second_step() first")
        self.zero_grad(set_to_none=True)
        with torch.enable_grad(), self.first_pass():
            loss = closure()
        if loss is None:
            raise TypeError(
                "the closure returned None: it must compute the loss, call loss.backward() and return the loss"
            )
        self.first_step(zero_grad=True, scaler=scaler)
        try:
            if not self._pending.skip:  # type: ignore[union-attr]
                with torch.enable_grad():
                    closure()
        except BaseException:
            self.restore()
            raise
        self.second_step(zero_grad=False, scaler=scaler)
        return loss

    # ------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (moments, step counts, param groups with ``rho``,
        ``adaptive``, ``eta``) plus a ``"samopt"`` entry."""
        if self._pending is not None:
            raise RuntimeError(
                "state_dict() called between first_step() and second_step(): the weights are at w + e; "
                "call second_step() or restore() first"
            )
        state = self.base_optimizer.state_dict()
        state["samopt"] = {"format": STATE_FORMAT, "kind": self._state_kind, "base": _name(self.base_optimizer)}
        if self.mask is not None:
            state["samopt"]["mask"] = self.mask.state_dict()
        return state

    #: The kind of samopt optimizer whose state this one reads (a subclass with state of its own has its own).
    _state_kind = "SAM"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`; the base optimizer's state comes back with it.

        Everything is checked before anything changes: the kind of samopt optimizer
        and its base optimizer, the parameter groups and their SAM keys, the shapes of
        the per-parameter state and the mask's state. A ``ValueError`` says what differs.
        """
        if self._pending is not None:
            raise RuntimeError("load_state_dict() called between first_step() and second_step(); call restore() first")
        meta = self._check_state(state_dict)
        self.base_optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "samopt"})
        if self.mask is not None:
            self.mask.load_state_dict(meta["mask"])
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _check_state(self, state_dict: Any) -> dict[str, Any]:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``state_dict``; returns its samopt entry."""
        if not isinstance(state_dict, dict) or "samopt" not in state_dict:
            raise ValueError(
                "not a samopt state_dict (it has no 'samopt' entry); a plain optimizer's state goes to "
                "opt.base_optimizer.load_state_dict()"
            )
        meta = state_dict["samopt"]
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported samopt state_dict format {meta!r}; this samopt reads format {STATE_FORMAT}")
        kind = meta.get("kind", "DeltaSAM" if "delta_generator" in meta else "SAM")  # older states name no kind
        if kind != self._state_kind:
            raise ValueError(
                f"the state_dict is a {kind}'s and this optimizer a {self._state_kind}: load it into a {kind}"
            )
        base = meta.get("base", _name(self.base_optimizer))
        if base != _name(self.base_optimizer):
            raise ValueError(
                f"the state_dict is of a {kind} over {base}, this one is over {_name(self.base_optimizer)}: "
                "construct it with the same base_optimizer"
            )
        saved = state_dict.get("param_groups")
        for i, group in enumerate(saved[: len(self.param_groups)] if isinstance(saved, list) else []):
            if isinstance(group, dict):
                _check_group(i, group, self.param_groups[i]["params"])
        _validate.optimizer_state(self.base_optimizer, {k: v for k, v in state_dict.items() if k != "samopt"})
        if (self.mask is None) != ("mask" not in meta):
            has = "has none" if self.mask is None else "has one"
            raise ValueError(
                f"the state_dict's mask entry does not match this optimizer, which {has}; "
                "construct the optimizer with the same mask= kind"
            )
        if self.mask is not None:
            self.mask.check_state(meta["mask"])
        return meta

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(bn={self.bn!r}, max_grad_norm={self.max_grad_norm}, mask={self.mask!r}, "
            f"base_optimizer={self.base_optimizer!r})"
        )
