"""The SAM engine: the two-pass protocol around any torch optimizer, with three plug-in seams.

One update takes the gradient ``g`` at the weights ``w``, moves to ``w + e``, takes the
gradient ``g_p`` there, returns to ``w`` bit for bit and steps the base optimizer
(Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, arXiv:2010.01412). :class:`SAM` validates, keeps state and
wires together the parts that do each job:

- :mod:`samopt.seams`: how ``e`` is built (ascent), how the update gradient is formed
  (descent), whether a step ascends (schedule), with SAM's behaviour as the defaults;
- :mod:`samopt.swap`: the move to ``w + e`` and back;
- :mod:`samopt.sync`: gradients and norms across ranks and FSDP shards;
- :mod:`samopt.bn`: BatchNorm statistics of the clean pass only;
- :mod:`samopt.functional`: the multi-tensor kernels.

The protocol is public: :meth:`SAM.step` drives it with a closure, and a training loop
of one's own drives it with :meth:`SAM.perturbed` (or :meth:`SAM.first_step` and
:meth:`SAM.second_step`); the user guide is docs/methods/sam.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import ParamsT
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from samopt import functional as kernels
from samopt import validation
from samopt.bn import BufferGuard
from samopt.seams import Ascent, Descent, GroupGrads, Pass, Policy, Schedule
from samopt.swap import WeightSwap
from samopt.sync import SYNC_MODES, GradientSync

__all__ = [
    "BN_MODES",
    "CHECK_MODES",
    "FUSABLE",
    "GROUP_KEYS",
    "SAM",
    "SYNC_MODES",
    "NonFiniteGradientError",
    "Work",
    "step_within_hooks",
]

#: Hyperparameters SAM keeps in every parameter group, beside the base optimizer's.
GROUP_KEYS = ("rho", "adaptive", "eta")
#: Allowed values of ``bn``.
BN_MODES = ("first", "both")
#: Allowed values of ``check``: when a non-finite gradient without a GradScaler is read on the host.
CHECK_MODES = ("deferred", "eager")
#: Version of the ``"samopt"`` entry of :meth:`SAM.state_dict` (1: before the seams; still read).
STATE_FORMAT = 2
#: The seams, in the order of the ``"samopt"`` entry.
SEAMS = ("ascent", "descent", "schedule")

#: ``closure()``, or ``closure(p)`` with the :class:`~samopt.seams.Pass` it runs.
Closure = Callable[..., Any]


class NonFiniteGradientError(RuntimeError, FloatingPointError):
    """A non-finite gradient (or δ-SAM norm estimate) without a GradScaler to skip the step; the weights are at ``w``.

    A ``RuntimeError`` (so ``except RuntimeError`` handlers still catch it) and a ``FloatingPointError`` (so
    ``samopt train`` reports it as a diverged run, not a crash). :attr:`step` is the
    step it happened in (``opt.work.steps`` then), or ``None`` when it is the current one.
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


def _check_group(index: int, group: dict[str, Any], params: list[Tensor]) -> None:
    """Check SAM's keys of a parameter group, and the base optimizer's ``lr`` and ``weight_decay``.

    ``params`` are the group's tensors (a saved group holds only their indices).
    """
    for key in GROUP_KEYS:
        if key not in group:
            raise ValueError(f"param_groups[{index}] has no {key!r}: a SAM parameter group needs {GROUP_KEYS}")
    validation.nonnegative(f"param_groups[{index}]['rho']", group["rho"])
    validation.boolean(f"param_groups[{index}]['adaptive']", group["adaptive"])
    validation.nonnegative(f"param_groups[{index}]['eta']", group["eta"])
    for key in ("lr", "weight_decay"):
        if key in group:
            validation.rate(f"param_groups[{index}][{key!r}]", group[key], params)
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


def step_within_hooks(owner: torch.optim.Optimizer, base: torch.optim.Optimizer) -> None:
    """``base.step()`` inside the step hooks of ``owner``, a wrapper whose own ``step`` torch does not hook
    (``step.hooked = True``): its hooks run once per update, the global ones in the base's step."""
    for pre in owner._optimizer_step_pre_hooks.values():
        pre(owner, (), {})
    base.step()
    for post in owner._optimizer_step_post_hooks.values():
        post(owner, (), {})


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


def _takes_an_argument(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` has a required positional parameter (for the :class:`~samopt.seams.Pass`)."""
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: called as a plain closure
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is inspect.Parameter.empty for p in params)


def _inverse_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """``1 / scale`` of ``scaler`` on its device, as ``GradScaler.unscale_`` computes it (no read-back)."""
    scale = scaler._get_scale_async()
    if scale is None:
        raise RuntimeError("the GradScaler has not scaled a loss yet: backward scaler.scale(loss) first")
    return scale.double().reciprocal().float()


def _non_finite(norm: Tensor) -> Tensor:
    """Whether ``norm`` (a norm: >= 0, inf or NaN) is inf or NaN, on its device, in two small kernels."""
    return ~(norm < math.inf)


def _poison(grads: list[Tensor], bad: Tensor) -> None:
    """Make one gradient entry NaN if ``bad`` is set (times 1 otherwise: bit for bit), so that a GradScaler that
    unscales ``grads`` finds an overflow of an earlier pass; one small kernel, no read-back."""
    g = next(g for g in grads if g.numel())
    g[(0,) * g.dim()].mul_(torch.where(bad.to(g.device), math.nan, 1.0).to(g.dtype))


def _skips_on_device(base: torch.optim.Optimizer) -> bool:
    """Whether ``base`` skips its step on the device when given ``found_inf`` (torch's fused optimizers, in every
    group: a group loaded from a state dict saved without ``fused`` is not)."""
    return getattr(base, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in base.param_groups)


#: Base optimizers samopt builds fused (``fused=True``) unless told otherwise: they can skip on the device.
FUSABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def fuse_kwargs(base: type[torch.optim.Optimizer], params: Sequence[Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``fused=True`` for a :data:`FUSABLE` optimizer over plain floating-point tensors on a device
    with fused kernels, unless ``fused``, ``foreach`` or ``differentiable`` was given: how :class:`SAM` builds its
    base optimizer (so that a step can skip on the device), and how to build a plain one to compare with it.

    Example::

        sgd = torch.optim.SGD(params, **fuse_kwargs(torch.optim.SGD, params, {"lr": 0.1}))
    """
    if base not in FUSABLE or any(k in kwargs for k in ("fused", "foreach", "differentiable")):
        return kwargs
    devices = _get_fused_kernels_supported_devices()
    plain = all(
        type(p) in (torch.nn.Parameter, Tensor) and p.is_floating_point() and p.device.type in devices for p in params
    )
    return {**kwargs, "fused": True} if plain and params else kwargs


class _NonFinite:
    """The steps whose non-finite gradient (without a GradScaler) was skipped on the device, and their report.

    The device keeps the number of the first such step not yet reported; after each step
    it is copied to the host without waiting (pinned memory and an event on a GPU), and
    :meth:`raise_if_arrived` raises once the copy has arrived.
    """

    def __init__(self) -> None:
        self.first: Tensor | None = None  # on the device: the first unreported step number, 0 for none
        self.host: Tensor | None = None
        self.event: torch.cuda.Event | None = None

    def record(self, bad: Tensor, step: int) -> None:
        if self.first is None or self.first.device != bad.device:
            cuda = bad.device.type == "cuda"
            self.first = torch.zeros((), dtype=torch.int64, device=bad.device)
            self.host = torch.zeros((), dtype=torch.int64, pin_memory=cuda)
            self.event = torch.cuda.Event() if cuda else None
        self.first = torch.where(bad & (self.first == 0), step, self.first)
        assert self.host is not None
        self.host.copy_(self.first, non_blocking=True)
        if self.event is not None:
            self.event.record()

    def raise_if_arrived(self, wait: bool = False) -> None:
        if self.host is None or self.first is None:
            return
        if self.event is not None and not self.event.query():
            if not wait:
                return
            self.event.synchronize()
        step = int(self.host.numpy())  # host memory that the copy has reached: no read-back
        if step:
            self.first.zero_()
            self.host.zero_()
            raise NonFiniteGradientError(
                f"non-finite gradient in step {step} (without a GradScaler); its update was skipped on the device "
                "and the weights are those before it. For fp16 pass a GradScaler (opt.step(closure, scaler=scaler)); "
                "SAM(..., check='eager') raises in the step itself",
                step,
            )


def _policy(name: str, value: Any, kind: type[Policy]) -> Any:
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a samopt.seams.{kind.__name__} or None, got {value!r}")
    return value


@dataclass
class Work:
    """What an optimizer's updates have cost, in forward/backward passes over the batch: :attr:`SAM.work`.

    Each update (``first_step``, overflow skips included) counts a clean pass and, if it
    ascended, a perturbed pass. A policy that runs more adds to ``extra_passes``
    (forward and backward) or ``extra_forwards`` (forward only: δ-SAM's probes). Mask
    updates (SSAM-F's Fisher pass, once per mask interval) run outside the updates and
    are not counted. ``opt.work.since(before)`` gives the work done since a copy.

    Example::

        before = opt.work.copy()
        ...                                  # an epoch
        opt.work.since(before).passes_per_step   # 2.0 for SAM, 1.2 for SAM every 5 steps
    """

    steps: int = 0
    ascents: int = 0
    clean_passes: float = 0.0
    perturbed_passes: float = 0.0
    extra_passes: float = 0.0
    extra_forwards: float = 0.0

    @property
    def passes_per_step(self) -> float:
        """Forward/backward passes per update (0 before the first)."""
        passes = self.clean_passes + self.perturbed_passes + self.extra_passes
        return passes / self.steps if self.steps else 0.0

    @property
    def ascent_fraction(self) -> float:
        """The fraction of updates that ran the perturbed pass (0 before the first)."""
        return self.ascents / self.steps if self.steps else 0.0

    @property
    def forwards_per_step(self) -> float:
        """Extra forward-only passes per update (0 before the first)."""
        return self.extra_forwards / self.steps if self.steps else 0.0

    def copy(self) -> Work:
        """A snapshot, to take :meth:`since` from later."""
        return dataclasses.replace(self)

    def since(self, before: Work) -> Work:
        """The work done since ``before`` (an earlier :meth:`copy`)."""
        return Work(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, float]:
        """The counts, ``passes_per_step``, ``ascent_fraction`` and ``forwards_per_step``, for a log."""
        rates = {
            "passes_per_step": self.passes_per_step,
            "ascent_fraction": self.ascent_fraction,
            "forwards_per_step": self.forwards_per_step,
        }
        return {**dataclasses.asdict(self), **rates}


def _work(saved: object) -> Work:
    """The :class:`Work` of a state_dict's ``"work"`` entry (``None``, from a state that predates it: none counted)."""
    if saved is None:
        return Work()
    names = [f.name for f in dataclasses.fields(Work)]
    if isinstance(saved, dict) and sorted(saved) == sorted(names):
        values = [saved[n] for n in names]
        if all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values):
            return Work(**saved)
    raise ValueError(f"the state_dict's work entry must hold {names}, each a finite number >= 0; got {saved!r}")


@dataclass
class _Step:
    """What :meth:`SAM.first_step` decided, for :meth:`SAM.second_step`."""

    scaler: torch.amp.GradScaler | None
    skip: bool = False  # an overflow seen on the host (check="eager"): no update at all
    bad: Tensor | None = None  # the same on the device (check="deferred"): a non-finite clean gradient
    ascended: bool = False  # the weights are at w + e
    clean: list[Tensor] | None = None  # a copy of g, for a Descent that needs it


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any torch optimizer, with plug-in ascent, descent and schedule.

    SAM (Foret et al., ICLR 2021, arXiv:2010.01412) and, with ``adaptive=True``,
    element-wise ASAM (Kwon et al., ICML 2021, arXiv:2102.11600): ``e = rho T^2 g /
    ||T g||``, ``T = |w| + eta`` for ASAM; Sparse SAM with ``mask=`` (Mi et al., NeurIPS
    2022, arXiv:2210.05177, :mod:`samopt.masks`); any other ascent, descent or schedule
    policy from :mod:`samopt.seams`. BatchNorm statistics are those of the clean pass
    (``bn="first"``); fp16 overflows skip the update with a ``scaler``; the return to
    ``w`` is exact. docs/methods/sam.md describes every argument.

    Args:
        params: parameters or groups (a group may carry its own ``rho``, ``adaptive``, ``eta``).
        base_optimizer: the optimizer **class** that applies the update, built over the
            same groups with ``**base_kwargs``; ``opt.param_groups`` is its list.
        rho: perturbation radius (>= 0; 0 gives exactly the base optimizer).
        adaptive, eta: ASAM and its offset in ``T = |w| + eta``.
        bn: ``"first"`` (the clean pass alone updates BatchNorm buffers) or ``"both"``.
        max_grad_norm: clip the descent gradient to this global norm (``None``: no clipping).
        mask: a :mod:`samopt.masks` mask (Sparse SAM), an ascent policy; ``None``: dense.
        ascent, descent, schedule: :mod:`samopt.seams` policies (``None``: SAM's).
        perturb_in_place: perturb the parameters' own storage (for CUDA graphs) instead
            of swapping it (:mod:`samopt.swap`).
        check: ``"deferred"`` (no read-back from the device in a step: a non-finite
            gradient without a GradScaler skips the update on the device and is raised
            by a later step or :meth:`check_finite`) or ``"eager"`` (read in the step,
            raised at once, and an overflow skips the perturbed pass); see docs/methods/sam.md.
        sync, ddp, average_grads, process_group: several ranks (:mod:`samopt.sync`).
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...). torch's
            SGD, Adam and AdamW (:data:`FUSABLE`) are built with ``fused=True`` over plain
            floating-point parameters unless ``fused``, ``foreach`` or ``differentiable`` is
            given, so that a step can skip its update on the device.

    Example::

        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)             # or, in a loop of one's own:

        F.cross_entropy(model(x), y).backward()
        with opt.perturbed() as ascending:   # at w + e if ascending; the update on leaving
            if ascending:
                F.cross_entropy(model(x), y).backward()
    """

    #: Whether :meth:`step`'s closure returns per-example losses and leaves the backward passes to the optimizer
    #: (δ-SAM), instead of calling ``backward()`` itself and returning the loss.
    per_example = False
    #: The kind of samopt optimizer whose state this one reads (a subclass driving the engine otherwise has its own).
    _state_kind = "SAM"

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.01,
        bn: str = "first",
        max_grad_norm: float | None = None,
        mask: Ascent | None = None,
        ascent: Ascent | None = None,
        descent: Descent | None = None,
        schedule: Schedule | None = None,
        perturb_in_place: bool = False,
        check: str = "deferred",
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
            "rho": validation.nonnegative("rho", rho),
            "adaptive": validation.boolean("adaptive", adaptive),
            "eta": validation.nonnegative("eta", eta),
        }
        self.bn = validation.choice("bn", bn, BN_MODES)
        self.max_grad_norm = validation.positive_or_none("max_grad_norm", max_grad_norm)
        self.perturb_in_place = validation.boolean("perturb_in_place", perturb_in_place)
        self.check = validation.choice("check", check, CHECK_MODES)
        validation.choice("sync", sync, SYNC_MODES)
        if mask is not None and not isinstance(mask, Ascent):
            raise TypeError(f"mask must be a samopt.masks.Mask (e.g. RandomMask(sparsity=0.5)) or None, got {mask!r}")
        if mask is not None and ascent is not None:
            raise ValueError("give mask= or ascent= (a mask is an ascent policy), not both")
        self.mask = mask
        self.ascent: Ascent = _policy("ascent", ascent if mask is None else mask, Ascent)
        self.descent: Descent = _policy("descent", descent, Descent)
        self.schedule: Schedule = _policy("schedule", schedule, Schedule)
        if self.ascent.sub_batches > 1 and type(self.schedule) is not Schedule:
            raise ValueError(
                f"an ascent on a sub-batch ({self.ascent!r}) needs every step to ascend: a step that did not would "
                f"update with the sub-batch's gradient; drop schedule={self.schedule!r}"
            )
        scheduled = type(self.schedule) is not Schedule
        if self.ascent.skips_clean_grads and (scheduled or self.descent.needs_clean):
            seam, policy = ("schedule", self.schedule) if scheduled else ("descent", self.descent)
            raise ValueError(
                f"{self.ascent!r} computes no clean gradient for the tensors it does not perturb, which "
                f"{seam}={policy!r} needs (a step that does not ascend updates with the clean gradient; such a "
                f"descent reads it): drop {seam}= or build the mask with skip_unperturbed=False"
            )
        super().__init__(params, defaults)
        base_kwargs = fuse_kwargs(base_optimizer, self._all_params(), base_kwargs)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **defaults}
        for i, group in enumerate(self.param_groups):
            _check_group(i, group, group["params"])  # SAM's keys, and the base optimizer's lr and weight_decay
        self._sync = GradientSync(
            self._all_params(), sync=sync, ddp=ddp, average_grads=average_grads, process_group=process_group
        )
        self._swap = WeightSwap(in_place=self.perturb_in_place or self._sync.sharded)  # FSDP gathers from its buffer
        # bn="both" keeps the perturbed pass's statistics, but not those of a step skipped on the device
        self._guard = BufferGuard() if self.bn == "first" or self.check == "deferred" else None
        self._step: _Step | None = None
        self._nonfinite = _NonFinite()
        self._flagged: Tensor | None = None  # set by a driver (δ-SAM) before first_step(): this step is non-finite
        self._base_ready = False  # the base optimizer has stepped once: fused SGD may skip its first step wrongly
        self._unsynced = False  # the last clean pass ran under DDP's no_sync() to skip tensors: samopt averages
        self._updates = 0  # the steps taken so far (eager: the updates applied): the index the schedule sees
        #: The passes the updates have cost so far (:class:`Work`); carried by :meth:`state_dict`.
        self.work = Work()
        self._bind()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step.hooked = True  # type: ignore[attr-defined]  # see SAM.step

    # ------------------------------------------------------------ configuration

    @property
    def sync(self) -> str:
        """``"global"`` or ``"local"``: what the perturbation is built from on several ranks."""
        return self._sync.mode

    @property
    def ddp(self) -> DistributedDataParallel | None:
        return self._sync.ddp

    @property
    def average_grads(self) -> bool:
        return self._sync.average_grads

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self._sync.process_group

    @property
    def swap(self) -> WeightSwap:
        """The :class:`~samopt.swap.WeightSwap` that moves the parameters; between updates a driver may use it to
        evaluate the model elsewhere (δ-SAM's probes), sharing its buffers."""
        return self._swap

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
        self._base_ready = False
        self._bind()

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _bind(self) -> None:
        """(Re)attach the ascent policy to every parameter (masks recompute over a new group at the next step)."""
        self.ascent.bind(self._all_params(), self, self.process_group, sharded=self._sync.sharded)
        self.descent.bind(self._all_params(), self, sharded=self._sync.sharded)

    def mask_density(self) -> float:
        """Fraction of parameter entries the perturbation reaches (1.0 without a mask)."""
        return self.ascent.density()

    # ---------------------------------------------------------------- protocol

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """The context the clean pass (forward **and** backward) runs in. :meth:`step` uses it; in a loop of one's
        own, run the clean pass in it.

        With ``sync="local"`` and ``ddp=`` it is DDP's ``no_sync()``. With an ascent that needs
        the gradient of only some tensors (a mask with ``granularity="tensor"``), the others
        have ``requires_grad`` off inside it, so their weight-gradient products are not run
        (set back to their values at entry on leaving, also after an exception; a step whose
        mask is due computes every gradient); under DDP (``ddp=``) it is then ``no_sync()``
        and samopt averages the gradients it needs. Outside it every gradient is computed and
        the step is the same (but for an fp16 overflow confined to the skipped tensors at
        ``w``, which only a full pass sees; the perturbed pass checks every gradient).
        """
        if self.ascent.skips_clean_grads and self._sync.world > 1 and self.ddp is None and not self.average_grads:
            raise RuntimeError(  # on the first step, before any update, on every rank alike
                f"{self.ascent!r} skips the clean gradients of the tensors it does not perturb, which a wrapper that "
                "averages gradients (DDP) would wait for: pass ddp=<the DistributedDataParallel model> (samopt then "
                "runs the clean pass under no_sync() and averages what it needs) or average_grads=True for a plain "
                "model on each rank, or build the mask with skip_unperturbed=False (the same perturbation, no saving)"
            )
        keep = self.ascent.clean_params()
        skip = []
        if keep is not None:
            live = {id(p) for p in keep}
            skip = [p for p in self._all_params() if p.requires_grad and id(p) not in live]
        # kept by a nested pass (which finds nothing left to switch off); cleared by first_step
        self._unsynced = self._unsynced or (bool(skip) and self.ddp is not None and self.sync == "global")
        flags = [p.requires_grad for p in skip]
        with self._sync.clean_pass(unsynced=self._unsynced):
            try:
                for p in skip:
                    p.requires_grad_(False)
                yield
            finally:
                for p, flag in zip(skip, flags, strict=True):
                    p.requires_grad_(flag)

    def _collect(self) -> list[GroupGrads]:
        """Each group with its parameters that have a gradient, and those gradients (this rank's shards of
        FSDP-sharded ones)."""
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

    def first_step(self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Move from ``w`` to ``w + e`` using the gradients at ``w`` in ``.grad``; returns whether the step ascended.

        It does not ascend after an overflow (with an enabled ``scaler``: the weights stay
        at ``w``, the gradients are kept so that the overflow reaches the scaler in
        :meth:`second_step`, and the update is skipped) or when the schedule says so (the
        gradients are kept: :meth:`second_step` then steps with them). Either way the
        perturbed pass is not run.

        Args:
            zero_grad: set the gradients to ``None`` after ascending, ready for the perturbed backward.
            scaler: the :class:`~torch.amp.GradScaler` whose scaled loss produced the gradients.
        """
        return self._ascend(zero_grad, scaler)

    @torch.no_grad()
    def _ascend(self, zero_grad: bool, scaler: torch.amp.GradScaler | None) -> bool:
        if self._step is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are already at w + e; "
                "call second_step() to finish the update or restore() to undo it"
            )
        self._nonfinite.raise_if_arrived()
        flagged, self._flagged = self._flagged, None
        scaler = _enabled(scaler)
        collected = self._collect()
        for i, (group, _, _) in enumerate(collected):
            _check_group(i, group, group["params"])
        grads = [g for _, _, gs in collected for g in gs]
        self._sync.ascent_gradients(grads, unsynced=self._unsynced)
        self._unsynced = False
        if not grads:
            raise RuntimeError(
                "no parameter has a gradient in the clean pass (at w): the closure, or your code "
                "before first_step(), must call loss.backward()"
            )
        if scaler is not None and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("Attempting to unscale FP16 gradients: keep fp32 parameters under fp16 autocast")
        ascends = self._ascends(grads, scaler)
        step = self._step = _Step(scaler=scaler, bad=flagged)  # registered before anything moves: restore() undoes
        self.work.steps += 1
        self.work.clean_passes += 1 / self.ascent.sub_batches
        if not ascends:
            return False  # second_step() steps with these gradients, unscaled there as for any optimizer
        found_inf = None if scaler is None else kernels.unscale_grads_(grads, _inverse_scale(scaler))
        norm = self._sync.over_shards(self.ascent.norm(collected))
        bad = _non_finite(norm)
        if found_inf is not None:
            bad = bad | (found_inf.to(bad.device) > 0)
        if flagged is not None:  # a driver's own check of this step (δ-SAM's norm estimate)
            bad = bad | flagged.to(bad.device)
        bad = self._sync.any_rank(bad)  # another rank's own gradient overflowed (sync="local")
        if self.check == "eager" or self.ascent.reads_gradient():
            if bool(bad):
                if scaler is None:
                    self._step = None
                    raise NonFiniteGradientError(
                        f"non-finite gradient in the clean pass (at w): gradient norm {norm.item()}; the weights "
                        "are unchanged. For fp16 pass a GradScaler (opt.step(closure, scaler=scaler))"
                    )
                step.skip = True
                return False
        else:
            step.bad = bad
        if self.descent.needs_clean:
            step.clean = [g.detach().clone() for g in grads]
        try:
            self.ascent.perturb(collected, norm, self._swap.move)
        except BaseException:
            self.restore()
            raise
        step.ascended = True
        self.work.ascents += 1
        self.work.perturbed_passes += 1
        if self._guard is not None:
            self._guard.start()
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return True

    def _ascends(self, grads: list[Tensor], scaler: torch.amp.GradScaler | None) -> bool:
        """The schedule's decision for this step, the same on every rank."""
        if type(self.schedule) is Schedule:
            return True  # SAM's: always, without a word between the ranks

        def grad_norm() -> float:  # of the unscaled gradient; inf or NaN on an fp16 overflow
            inv_scale = 1.0 if scaler is None else 1.0 / scaler.get_scale()
            return inv_scale * self._sync.over_shards(kernels.global_norm(grads)).item()

        return self._sync.any_rank(self.schedule.ascend(self._updates, grad_norm))

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`first_step`: weights (and buffers, with ``bn="first"``) back to their values at ``w``.

        Needed only when the perturbed pass of the two-phase API fails and no
        :meth:`second_step` follows; :meth:`step` and :meth:`perturbed` do it themselves.
        A no-op when the weights are not perturbed.
        """
        step, self._step = self._step, None
        self._swap.restore()
        if self._guard is not None and self.bn == "first":
            self._guard.restore()
        elif self._guard is not None:  # bn="both": keep the perturbed pass's statistics, unless skipped on the device
            self._guard.restore(only=False if step is None or step.bad is None else step.bad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None) -> None:
        """Return to ``w`` exactly and step the base optimizer with the update gradient.

        The update gradient is the one in ``.grad`` (at ``w + e``, or at ``w`` after a step
        that did not ascend) as the descent policy forms it; clipped to ``max_grad_norm``.
        The step hooks of this optimizer (and the global ones, through the base optimizer's
        step) run once, around the base optimizer's step.

        A non-finite gradient in either pass skips the update. With ``check="deferred"``
        the decision stays on the device when the base optimizer can skip there (torch's
        fused SGD, Adam and AdamW, which samopt builds by default; after its first step),
        and is read back once otherwise; the policies' step counters then count skipped
        steps too, as an LR scheduler does. With ``check="eager"`` they count applied
        updates.

        Args:
            zero_grad: set the gradients to ``None`` after the update.
            scaler: the same :class:`~torch.amp.GradScaler` given to :meth:`first_step`.
                The gradients are unscaled through ``scaler.unscale_`` (so call only
                ``scaler.update()`` afterwards, not ``scaler.step``); an inf/NaN in
                this or the first pass skips the update.
        """
        step = self._step
        if step is None:
            raise RuntimeError("second_step() called without a preceding first_step(): the weights are not perturbed")
        replaced = self._swap.replaced()
        self.restore()
        if replaced:
            raise RuntimeError(
                f"{replaced} parameter(s) had their .data replaced by something else during the perturbed pass "
                "(a wrapper that manages parameter storage?); they are back at w and no update was applied. "
                "Construct SAM with perturb_in_place=True"
            )
        scaler = _enabled(scaler)
        if scaler is not step.scaler:
            raise ValueError(
                "second_step() must get the same scaler as first_step() "
                f"(first_step: {step.scaler!r}, second_step: {scaler!r}); the update was not applied"
            )
        collected = self._collect()
        params = [p for _, ps, _ in collected for p in ps]
        grads = [g for _, _, gs in collected for g in gs]
        if step.ascended or step.skip:
            # a skipped step in local mode kept each rank's own first-pass gradients: averaging them spreads the
            # overflow to every rank's scaler, so all lower their scale alike
            self._sync.average(grads, force=step.skip and self.sync == "local")
        elif self.sync == "local":
            self._sync.average(grads, force=True)  # no ascent: each rank's own clean gradients are the update's
        where = "the perturbed pass (at w + e)" if step.ascended or step.skip else "the clean pass (at w)"
        if not grads:
            raise RuntimeError(
                f"no parameter has a gradient in {where}: call loss.backward() between first_step() and second_step()"
            )
        if scaler is not None:
            if step.bad is not None:  # a clean-pass overflow must reach the scaler, which then lowers its scale
                _poison(grads, step.bad)
            scaler.unscale_(self)
        if step.ascended:
            self.descent.combine(params, step.clean, grads)
        elif not step.skip:
            self.descent.without_ascent(params, grads)
        total = self._sync.over_shards(kernels.global_norm(grads))
        if self.check == "eager" or step.skip:
            total_f = total.item()
            if step.skip or not math.isfinite(total_f):
                if scaler is None:
                    raise NonFiniteGradientError(
                        f"non-finite gradient in {where}: gradient norm {total_f}; the weights are at w and not "
                        "updated. For fp16 pass a GradScaler (opt.step(closure, scaler=scaler))"
                    )
            else:
                if self.max_grad_norm is not None:
                    kernels.clip_grads_(grads, total, self.max_grad_norm)
                self._base_step()
                self.ascent.advance()
                self._updates += 1
        else:
            bad = _non_finite(total)
            if step.bad is not None:
                bad = bad | step.bad.to(bad.device)
            if self.max_grad_norm is not None:
                kernels.clip_grads_(grads, total, self.max_grad_norm)
            self._update_unless(bad, scaler is None, where)
        # An LR scheduler attached to this object watches step(); the two-phase API never calls it.
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _update_unless(self, bad: Tensor, report: bool, where: str) -> None:
        """Step the base optimizer unless ``bad`` (a bool on the device) is set, without reading it back where the
        base optimizer can skip on the device (``found_inf``, as :class:`~torch.amp.GradScaler` gives torch's fused
        optimizers); otherwise read it, once. A skipped step is reported (``report``: no scaler) by
        :class:`NonFiniteGradientError`: at once after a read, else at a later step (:meth:`check_finite`)."""
        if self._base_ready and _skips_on_device(self.base_optimizer) and not self.descent.updates_after:
            self.base_optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
            try:
                self._base_step()
            finally:
                del self.base_optimizer.found_inf  # type: ignore[attr-defined]
            if report:
                self._nonfinite.record(bad, self.work.steps)
        elif bool(bad):
            if report:
                raise NonFiniteGradientError(
                    f"non-finite gradient in {where} or before it; the weights are at w and not updated. For "
                    "fp16 pass a GradScaler (opt.step(closure, scaler=scaler))"
                )
            return
        else:
            self._base_step()
            self._base_ready = True
        self.ascent.advance()
        self._updates += 1

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteGradientError` if a step since the last report had a non-finite gradient
        without a GradScaler (its update was skipped on the device); reads one flag back from the device.

        With ``check="deferred"`` (the default) a step never waits for the device: the error
        is raised by the first ``first_step()`` (or ``step()``) after the flag has reached the
        host, on a CPU the next one; call this where the answer must be known at once
        (before saving a checkpoint, at the end of an epoch).
        """
        self._nonfinite.raise_if_arrived(wait=True)

    def _base_step(self) -> None:
        step_within_hooks(self, self.base_optimizer)
        self.descent.after_update()

    @contextlib.contextmanager
    def perturbed(self, scaler: torch.amp.GradScaler | None = None, zero_grad: bool = False) -> Iterator[bool]:
        """The perturbed pass of one update, for a training loop of one's own.

        With the gradients at ``w`` in ``.grad``, entering moves to ``w + e``
        (:meth:`first_step`) and yields whether the step ascended; run the perturbed
        forward and backward inside only if it did. Leaving returns to ``w`` and applies
        the update (:meth:`second_step`); an exception inside returns to ``w`` without
        an update and propagates. ``zero_grad`` sets the gradients to ``None`` after the
        update.

        Example::

            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            with opt.perturbed(scaler=scaler) as ascending:
                if ascending:
                    scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.update()
        """
        ascending = self._ascend(True, scaler)
        try:
            yield ascending
        except BaseException:
            self.restore()
            raise
        self.second_step(zero_grad=zero_grad, scaler=scaler)

    def step(self, closure: Closure | None = None, scaler: torch.amp.GradScaler | None = None) -> Any:
        """One update: the closure at ``w``, then, if the step ascends, at ``w + e``; returns the loss at ``w``.

        Gradients are zeroed before each closure call. If the closure raises at ``w + e``
        (``KeyboardInterrupt`` included) the weights and buffers are restored to ``w``
        before the exception propagates. A closure with a required argument gets the
        :class:`~samopt.seams.Pass` it runs (``"clean"``, then ``"perturbed"``); an ascent
        on a sub-batch (:class:`~samopt.sub_batch.SubBatchAscent`) needs one.
        """
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that computes the loss, calls loss.backward() and returns the loss: "
                "opt.step(closure); or use opt.first_step() / opt.second_step()"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if self._step is not None:
            raise RuntimeError("step() called between first_step() and second_step(); call second_step() first")
        m = self.ascent.sub_batches
        takes_pass = _takes_an_argument(closure)
        if m > 1 and not takes_pass:
            raise TypeError(
                f"{self.ascent!r} runs the clean pass on 1/{m} of the batch, which only the closure can cut: give it "
                "one argument, a samopt.seams.Pass (def closure(p): xb, yb = p.take(x, y); ...)"
            )
        self.zero_grad(set_to_none=True)
        with torch.enable_grad(), self.first_pass():
            loss = closure(Pass("clean", m)) if takes_pass else closure()
        if loss is None:
            raise TypeError(
                "the closure returned None: it must compute the loss, call loss.backward() and return the loss"
            )
        with self.perturbed(scaler=scaler) as ascending:
            if ascending:
                with torch.enable_grad():
                    if takes_pass:
                        closure(Pass("perturbed"))
                    else:
                        closure()
        return loss

    step.hooked = True  # type: ignore[attr-defined]  # torch must not wrap it: the hooks run once, in _base_step

    # ------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (moments, step counts, groups) plus a ``"samopt"`` entry: the kind of
        optimizer and base optimizer, SAM's keys of each group, and each seam's state. The state-dict hooks of
        this optimizer run as on any torch optimizer."""
        if self._step is not None:
            raise RuntimeError(
                "state_dict() called between first_step() and second_step(): the weights are at w + e; "
                "call second_step() or restore() first"
            )
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        state = self.base_optimizer.state_dict()
        groups = [{key: group.pop(key) for key in GROUP_KEYS} for group in state["param_groups"]]
        state["samopt"] = {
            "format": STATE_FORMAT,
            "kind": self._state_kind,
            "base": _name(self.base_optimizer),
            "groups": groups,
            "updates": self._updates,
            "work": dataclasses.asdict(self.work),
            **{seam: getattr(self, seam).state_dict() for seam in SEAMS},
        }
        for post in self._optimizer_state_dict_post_hooks.values():
            result = post(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or one written by samopt before the seams).

        Everything is checked before anything changes: the kind of samopt optimizer
        and its base optimizer, the parameter groups and their SAM keys, the shapes of
        the per-parameter state and each seam's state. A ``ValueError`` says what differs.
        The load-state-dict hooks of this optimizer run as on any torch optimizer.
        """
        if self._step is not None:
            raise RuntimeError("load_state_dict() called between first_step() and second_step(); call restore() first")
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre(self, state_dict)
            if result is not None:
                state_dict = result
        base, policies, updates, work = self._check_state(state_dict)
        self.base_optimizer.load_state_dict(base)
        for seam in SEAMS:
            getattr(self, seam).load_state_dict(policies[seam])
        self._updates, self.work = updates, work
        self._base_ready = False
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def _check_state(self, state_dict: Any) -> tuple[dict[str, Any], dict[str, Any], int, Work]:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``state_dict``; returns the base optimizer's
        state dict (SAM's keys back in its groups), each seam's state, the update count and the work done."""
        if not isinstance(state_dict, dict) or "samopt" not in state_dict:
            raise ValueError(
                "not a samopt state_dict (it has no 'samopt' entry); a plain optimizer's state goes to "
                "opt.base_optimizer.load_state_dict()"
            )
        meta = state_dict["samopt"]
        if not isinstance(meta, dict) or meta.get("format") not in (1, STATE_FORMAT):
            raise ValueError(
                f"unsupported samopt state_dict format {meta!r}; this samopt reads format 1 (before the seams) and "
                f"format {STATE_FORMAT}"
            )
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
        if meta["format"] == STATE_FORMAT:  # SAM's keys are in the samopt entry; the groups hold the base's
            keys = meta.get("groups")
            if not isinstance(saved, list) or not isinstance(keys, list) or len(keys) != len(saved):
                raise ValueError("the state_dict's samopt entry does not hold SAM's keys of each parameter group")
            for i, group in enumerate(saved):
                clash = sorted(set(GROUP_KEYS) & set(group)) if isinstance(group, dict) else []
                if clash:
                    raise ValueError(
                        f"param_groups[{i}] of the state_dict holds {clash}, which format {STATE_FORMAT} keeps in "
                        "its samopt entry: the two disagree, edit the samopt entry's groups instead"
                    )
            saved = [
                {**g, **k} if isinstance(g, dict) and isinstance(k, dict) else g
                for g, k in zip(saved, keys, strict=True)
            ]
            policies = {seam: meta.get(seam) for seam in SEAMS}
            updates = meta.get("updates")
        else:  # format 1: SAM's keys in the groups, a mask's state under "mask", δ-SAM's generator beside it
            policies = {"ascent": self.ascent.state_from_format1(meta), "descent": {}, "schedule": {}}
            updates = 0
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"the state_dict's update count must be an integer >= 0, got {updates!r}")
        for i, group in enumerate(saved[: len(self.param_groups)] if isinstance(saved, list) else []):
            if isinstance(group, dict):
                _check_group(i, group, self.param_groups[i]["params"])
        base_state = {**{k: v for k, v in state_dict.items() if k != "samopt"}, "param_groups": saved}
        validation.optimizer_state(self.base_optimizer, base_state)
        for seam in SEAMS:
            getattr(self, seam).check_state(policies[seam])
        return base_state, policies, updates, _work(meta.get("work"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(bn={self.bn!r}, max_grad_norm={self.max_grad_norm}, ascent={self.ascent!r}, "
            f"descent={self.descent!r}, schedule={self.schedule!r}, base_optimizer={self.base_optimizer!r})"
        )
