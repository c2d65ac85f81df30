"""Sparse perturbation masks: which entries of SAM's perturbation are applied.

Sparse SAM (Mi et al., "Make Sharpness-Aware Minimization Stronger: A Sparsified
Perturbation Approach", NeurIPS 2022, arXiv:2210.05177) perturbs only a subset of
the weights: ``e = m * rho * g / ||g||`` with a binary mask ``m`` and the norm of the
full gradient. A mask object plugs into the one engine through ``SAM(..., mask=)``:

- :class:`FisherMask` (SSAM-F): the entries with the largest empirical Fisher
  information, recomputed every ``update_interval`` steps;
- :class:`DynamicSparseMask` (SSAM-D): a random start, then drop/grow as in dynamic
  sparse training, with a cosine-decayed drop rate;
- :class:`RandomMask`: a uniformly random mask, the baseline.

``sparsity`` is the fraction of entries NOT perturbed, in [0, 1). Selection is one
global top-k over every parameter of the optimizer, keeping exactly
``floor(N * (1 - sparsity))`` of the ``N`` entries (computed on the decimal value of
``sparsity``, so ``N = 10, sparsity = 0.7`` keeps 3). ``granularity="tensor"`` turns
whole parameter tensors on or off instead (the structured masks of the journal
extension, arXiv:2306.17504); such a mask saves time, because the clean pass computes
no gradient for the tensors it leaves off (:meth:`samopt.SAM.first_pass`), and its
perturbation is normalised over the live tensors (``renormalize=True``: the full
gradient's norm is not computed). :class:`SelectMask` keeps tensors chosen by module
and name; :func:`sam_on` is SAM-ON's choice, the affine parameters of the
normalisation layers. Masks are bool tensors on each parameter's device.

Under ``torch.distributed`` the masks are the same on every rank, whatever the
optimizer's ``sync``: the mask's generator takes rank 0's state when it is bound,
the Fisher scores are summed over the ranks (each rank scores ``num_samples`` of
its own examples) and SSAM-D's gradient scores are averaged before any choice.

Example::

    mask = samopt.masks.RandomMask(sparsity=0.5, seed=0)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.05)
    ...
    opt.mask_density()   # 0.5 (up to the floor)
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from samopt import distributed as D
from samopt import functional as kernels
from samopt import validation
from samopt.per_sample import (
    Inputs,
    chunk_size_for,
    inputs_cat,
    inputs_index,
    inputs_len,
    inputs_map,
    per_sample_grads,
)
from samopt.seams import Ascent, GroupGrads, Move, Part, perturb_parts

__all__ = [
    "GRANULARITIES",
    "NORM_LAYERS",
    "DynamicSparseMask",
    "FisherMask",
    "Mask",
    "RandomMask",
    "SelectMask",
    "keep_count",
    "sam_on",
    "select_top",
]

#: Allowed values of ``granularity``.
GRANULARITIES = ("element", "tensor")
#: Version of a mask's :meth:`Mask.state_dict`.
MASK_FORMAT = 1
#: Memory bound for one chunk of per-example gradients in :class:`FisherMask`.
FISHER_CHUNK_BYTES = 256 << 20


def keep_count(numel: int, sparsity: float, factor: float = 1.0) -> int:
    """``floor(numel * (1 - sparsity) * factor)``, exact on the decimal value of ``sparsity``.

    (``factor`` is taken exactly as the binary float it is.)

    Example::

        keep_count(10, 0.8)   # 2 (float arithmetic would give floor(1.9999999999999996) = 1)
    """
    return math.floor(numel * (1 - Fraction(repr(float(sparsity)))) * Fraction(factor))


def select_top(
    scores: Sequence[Tensor], k: int, *, granularity: str = "element", eligible: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """Bool masks marking the ``k`` highest-scoring entries across all ``scores`` together.

    One global ranking over every tensor (not per tensor), as Sparse SAM's mask
    selection. ``granularity="tensor"`` ranks whole tensors by their mean score
    and takes them greedily, in that order, whenever they still fit in the budget
    of ``k`` entries (so at most ``k`` are selected). ``eligible`` (bool masks)
    restricts the choice; ``k`` must not exceed the eligible count. Scores must not
    be NaN; ties are broken by :func:`torch.topk`.

    Example::

        masks = select_top([fisher_w, fisher_b], k=100)
    """
    device = scores[0].device
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the number of entries), got {k}")
    if granularity == "tensor":
        means = torch.stack(
            [s.float().mean().to(device) if s.numel() else torch.zeros((), device=device) for s in scores]
        )
        ok = [True] * len(scores) if eligible is None else [bool(e.all()) for e in eligible]
        order = torch.argsort(means.to(device), descending=True, stable=True).tolist()
        picked = [False] * len(scores)
        budget = k
        for i in order:
            if ok[i] and 0 < scores[i].numel() <= budget:
                picked[i] = True
                budget -= scores[i].numel()
        return [torch.full_like(s, c, dtype=torch.bool) for s, c in zip(scores, picked, strict=True)]
    flat = torch.cat([s.detach().reshape(-1).to(device=device, dtype=torch.float32) for s in scores])
    if eligible is not None:
        elig = torch.cat([e.reshape(-1).to(device) for e in eligible])
        available = int(elig.sum())
        if k > available:
            raise ValueError(f"cannot select {k} entries among {available} eligible ones")
        flat = flat.masked_fill(~elig, -math.inf)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    if k > 0:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    out, start = [], 0
    for s in scores:
        out.append(chosen[start : start + s.numel()].view(s.shape).to(s.device))
        start += s.numel()
    return out


class Mask(Ascent):
    """Base class of perturbation masks: an ascent policy (:class:`samopt.seams.Ascent`) that perturbs only the
    live entries, with its bookkeeping, schedule and state.

    Subclasses implement :meth:`compute` (new masks from the current weights and
    gradients). The engine calls :meth:`bind` once with every parameter of the
    optimizer; :meth:`perturb` recomputes the mask when it is due (:meth:`maybe_update`)
    and moves the live entries; :meth:`advance` counts each step (see :meth:`SAM.second_step
    <samopt.SAM.second_step>` for those skipped for an overflow).

    Args:
        sparsity: fraction of entries NOT perturbed, in [0, 1). 0 perturbs every
            entry, which is SAM bit for bit.
        granularity: ``"element"`` (the paper) or ``"tensor"`` (whole tensors).
        renormalize: ``False`` (as the official code): ``e = m * rho * g / ||g||``
            with the full gradient's norm, so ``||e|| <= rho``. ``True``: divide by
            ``||m * g||`` instead, so the masked perturbation has norm ``rho``.
            ``None`` (default): ``True`` for a tensor mask (whose skipping clean pass
            does not compute the full gradient), ``False`` for an element mask.
        skip_unperturbed: with ``granularity="tensor"``, compute no clean gradient for
            the tensors the mask leaves off (default ``True``: the time saving); every
            step must then ascend (no schedule) and on several ranks the optimizer needs
            ``ddp=`` or ``average_grads=True``. ``False`` computes them: the same
            perturbation, without the saving (and ``renormalize=False`` becomes possible).
        update_interval: recompute the mask every this many steps (the
            first mask is computed at the first step); ``None``: never recompute.
        seed: seed of the mask's own random generator (random masks, sampled
            labels); ``None`` takes ``torch.initial_seed()``. Its state is in
            :meth:`state_dict`, so a resumed run draws the same masks.
    """

    def __init__(
        self,
        sparsity: float,
        *,
        granularity: str = "element",
        renormalize: bool | None = None,
        skip_unperturbed: bool = True,
        update_interval: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.sparsity = validation.unit_interval("sparsity", sparsity, include_one=False)
        self.granularity = validation.choice("granularity", granularity, GRANULARITIES)
        self.skip_unperturbed = validation.boolean("skip_unperturbed", skip_unperturbed)
        if renormalize is None:
            renormalize = self.granularity == "tensor"  # the same perturbation whether or not the pass skips
        self.renormalize = validation.boolean("renormalize", renormalize)
        if self.skips_clean_grads and not self.renormalize:
            raise ValueError(
                "renormalize=False divides by the full gradient's norm, which a tensor mask that skips the "
                "unperturbed tensors does not compute: give renormalize=True (or None), or skip_unperturbed=False"
            )
        self.update_interval = validation.positive_int("update_interval", update_interval, allow_none=True)
        validation.seed_or_none("seed", seed)
        self.seed = torch.initial_seed() if seed is None else seed
        self.steps = 0  # steps so far
        self.last_update: int | None = None  # value of ``steps`` at the last mask computation
        self.masks: list[Tensor] | None = None
        self.live: list[int] = []  # live entries of each mask
        self.params: list[Tensor] | None = None
        self.generator: torch.Generator | None = None
        self.group: dist.ProcessGroup | None = None
        self._owner: weakref.ref | None = None

    # ---------------------------------------------------------------- engine hooks

    def bind(
        self, params: Sequence[Tensor], owner: object, group: dist.ProcessGroup | None = None, *, sharded: bool = False
    ) -> None:
        """Attach to the parameters (all of them, in param-group order) of the optimizer ``owner``.

        Binding again (the optimizer got a new parameter group) drops the masks, so
        the next step computes new ones over all parameters; the generator goes on
        from where it was. ``group``: the ranks the masks must agree over (every rank
        binds; the generator takes the state of the group's first rank).
        """
        if sharded:
            raise ValueError(
                "masks over FSDP-sharded parameters are not supported (the top-k needs every shard's scores); "
                "use dense SAM with FSDP, or DDP for Sparse SAM"
            )
        if self._owner is not None and self._owner() is not None and self._owner() is not owner:
            raise ValueError("this mask is already bound to another optimizer; create one mask per optimizer")
        params = list(params)
        if not params:
            raise ValueError("a mask needs at least one parameter")
        if self.generator is None:
            self.generator = torch.Generator(device=params[0].device)
            self.generator.manual_seed(self.seed)
        self.group = group
        D.broadcast_generator_(self.generator, group)
        self._owner, self.params = weakref.ref(owner), params
        self._index = {p: i for i, p in enumerate(params)}
        self._set(None)

    def perturb(self, groups: Sequence[GroupGrads], norm: Tensor, move: Move) -> None:
        """Update the mask if due, then move the live entries to ``w + m rho T^2 g / norm`` (``norm``: the full
        gradient's ``||T g||``, or the masked one with ``renormalize=True``); all-off tensors are not touched."""
        self.maybe_update([p.grad for p in self._bound()])
        parts: list[Part] = []
        for group, params, grads in groups:
            full: tuple[list[Tensor], list[Tensor]] = ([], [])
            some: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
            for p, g in zip(params, grads, strict=True):
                i = self._index[p]
                if self.live[i] == p.numel():
                    full[0].append(p)
                    full[1].append(g)
                elif self.live[i]:
                    some[0].append(p)
                    some[1].append(g)
                    some[2].append(self.mask_of(i))
            parts += [(group, *full, None), (group, *some)]
        if self.renormalize:
            norms = [
                kernels.perturbation_norm(ps, gs, adaptive=g["adaptive"], eta=g["eta"], masks=ms)
                for g, ps, gs, ms in parts
                if ps
            ]
            norm = torch.where(norm > 0, kernels.global_norm(norms).to(norm.device), 0.0)
        perturb_parts(parts, norm, move)

    @property
    def skips_clean_grads(self) -> bool:
        """Whether the clean pass computes the gradients of the live tensors only (``granularity="tensor"`` with
        ``skip_unperturbed``)."""
        return self.granularity == "tensor" and self.skip_unperturbed

    def clean_params(self) -> list[Tensor] | None:
        """The live tensors, or ``None`` (every parameter) for an element mask and on a step whose mask is due
        (a new mask may read every gradient, and which tensors are live is known only after it)."""
        if not self.skips_clean_grads or self.due():
            return None
        return [p for p, n in zip(self._bound(), self.live, strict=True) if n]

    def reads_gradient(self) -> bool:
        """Whether a new mask is computed from this step's gradient (:meth:`due`)."""
        return self.due()

    def due(self) -> bool:
        """Whether :meth:`maybe_update` will compute a new mask now: there is none yet, or
        ``update_interval`` steps have passed since the last one."""
        if self.masks is None or self.last_update is None:
            return True
        return self.update_interval is not None and self.steps - self.last_update >= self.update_interval

    def maybe_update(self, grads: Sequence[Tensor | None]) -> bool:
        """Compute new masks if :meth:`due`; ``grads`` are the gradients at ``w`` (``None``: no gradient)."""
        if not self.due():
            return False
        params = self._bound()
        if keep_count(self.numel, self.sparsity) == self.numel:
            masks = [torch.ones_like(p, dtype=torch.bool) for p in params]  # sparsity 0: nothing to rank
        else:
            masks = self.compute(params, grads)
        budget = keep_count(self.numel, self.sparsity)
        smallest = min((p.numel() for p in params if p.numel()), default=0)
        if self.granularity == "tensor" and budget < smallest and not any(bool(m.any()) for m in masks):
            raise ValueError(
                f"sparsity={self.sparsity} leaves a budget of {budget} parameter(s), which no whole tensor fits (the "
                f"smallest has {smallest}): the tensor mask would perturb nothing; lower sparsity"
            )
        self._set([m.to(device=p.device, dtype=torch.bool) for m, p in zip(masks, params, strict=True)])
        self.last_update = self.steps
        return True

    def _set(self, masks: list[Tensor] | None) -> None:
        self.masks = masks
        self.live = [] if masks is None else [int(m.sum()) for m in masks]

    def advance(self) -> None:
        """Count one step (one whose update was skipped on the device too, with ``check="deferred"``)."""
        self.steps += 1

    def compute(self, params: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        """New masks for ``params`` (one bool tensor each). Implemented by subclasses."""
        raise NotImplementedError

    # ------------------------------------------------------------------ queries

    @property
    def numel(self) -> int:
        """Number of maskable entries (all parameters of the optimizer)."""
        return sum(p.numel() for p in self._bound())

    def mask_of(self, index: int) -> Tensor:
        """The bool mask of the ``index``-th bound parameter."""
        if self.masks is None:
            raise RuntimeError("no mask yet: it is computed at the first first_step()")
        return self.masks[index]

    def density(self) -> float:
        """Fraction of entries perturbed (live) under the current masks."""
        if self.masks is None:
            raise RuntimeError("no mask yet: it is computed at the first first_step()")
        return sum(self.live) / self.numel

    def _bound(self) -> list[Tensor]:
        if self.params is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to an optimizer: pass it as SAM(..., mask=)")
        return self.params

    def _rand(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Uniform scores in [0, 1) from the mask's generator, shaped like each parameter."""
        dev = self.generator.device  # type: ignore[union-attr]
        flat = torch.rand(sum(p.numel() for p in params), generator=self.generator, device=dev)
        return [s.view(p.shape) for s, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]

    # -------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Masks, schedule position and generator state."""
        self._bound()
        return {
            "format": MASK_FORMAT,
            "kind": type(self).__name__,
            "steps": self.steps,
            "last_update": self.last_update,
            "masks": None if self.masks is None else [m.clone() for m in self.masks],
            "generator": self.generator.get_state(),  # type: ignore[union-attr]
        }

    def check_state(self, state: object) -> None:
        """Raise ``ValueError`` unless ``state`` is a :meth:`state_dict` this mask can load."""
        if state == {}:
            raise ValueError(
                "the state_dict's mask entry does not match this optimizer, which has one; "
                "construct the optimizer with the same mask= kind"
            )
        params = self._bound()
        fmt = state.get("format") if isinstance(state, dict) else None
        if not isinstance(state, dict) or fmt != MASK_FORMAT:
            raise ValueError(f"unsupported mask state format {fmt!r}; this samopt reads mask format {MASK_FORMAT}")
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"mask state is from a {state.get('kind')}, not a {type(self).__name__}")
        masks = state["masks"]
        if masks is not None and (
            len(masks) != len(params) or any(m.shape != p.shape for m, p in zip(masks, params, strict=False))
        ):
            raise ValueError("mask state does not match the optimizer's parameters (count or shapes differ)")
        gen = state["generator"]
        if not torch.is_tensor(gen) or gen.shape != self.generator.get_state().shape:  # type: ignore[union-attr]
            raise ValueError(
                f"the mask's saved generator state does not fit its generator on {self.generator.device} "  # type: ignore[union-attr]
                "(saved on another device type?)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (from a mask of the same kind over the same parameters)."""
        self.check_state(state)
        masks = state["masks"]
        if masks is not None:
            masks = [m.to(device=p.device, dtype=torch.bool).clone() for m, p in zip(masks, self._bound(), strict=True)]
        self._set(masks)
        self.steps, self.last_update = int(state["steps"]), state["last_update"]
        self.generator.set_state(state["generator"])  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.sparsity}, granularity={self.granularity!r}, "
            f"renormalize={self.renormalize}, skip_unperturbed={self.skip_unperturbed}, "
            f"update_interval={self.update_interval})"
        )


class RandomMask(Mask):
    """A uniformly random mask with exactly ``floor(N * (1 - sparsity))`` live entries.

    The control for Sparse SAM's informed masks (Mi et al., NeurIPS 2022,
    arXiv:2210.05177): same budget, no information. Drawn at the first step and,
    with ``update_interval``, redrawn every that many updates.

    Example::

        opt = samopt.SAM(params, torch.optim.SGD, rho=0.1, mask=samopt.masks.RandomMask(0.5, seed=0), lr=0.05)
    """

    def compute(self, params: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        return select_top(self._rand(params), keep_count(self.numel, self.sparsity), granularity=self.granularity)


#: The normalisation layers whose affine parameters :func:`sam_on` perturbs (by module type, not by name).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


class SelectMask(Mask):
    """A fixed tensor mask: the parameters of ``model`` for which ``select(module, name)`` is true.

    ``select`` gets each module of ``model`` and the name of each of its own parameters
    (``"weight"``, ``"bias"``, ...). A tensor mask: the clean pass computes the gradient of
    the selected tensors only and the perturbation is normalised over them (see
    :class:`Mask`). :func:`sam_on` is SAM-ON's selection.

    Example (the last layer only)::

        mask = samopt.masks.SelectMask(model, lambda module, name: module is model.fc)
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, mask=mask, lr=0.1)

    Args:
        model: the module whose parameters the optimizer holds (or some of them).
        select: ``select(module, name) -> bool``.
        renormalize, skip_unperturbed: see :class:`Mask`.
    """

    def __init__(
        self,
        model: nn.Module,
        select: Callable[[nn.Module, str], bool],
        *,
        renormalize: bool | None = None,
        skip_unperturbed: bool = True,
    ) -> None:
        super().__init__(0.0, granularity="tensor", renormalize=renormalize, skip_unperturbed=skip_unperturbed)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(select):
            raise TypeError(f"select must be a callable select(module, name) -> bool, got {select!r}")
        chosen = {id(p): p for m in model.modules() for n, p in m.named_parameters(recurse=False) if select(m, n)}
        if not chosen:
            raise ValueError("select chose no parameter of the model: it must return True for at least one")
        self.selected = list(chosen.values())

    def bind(
        self, params: Sequence[Tensor], owner: object, group: dist.ProcessGroup | None = None, *, sharded: bool = False
    ) -> None:
        super().bind(params, owner, group, sharded=sharded)
        chosen = {id(p) for p in self.selected}
        picked = [p for p in self._bound() if id(p) in chosen and p.numel()]
        if not picked:
            raise ValueError("none of the parameters the mask selected is in the optimizer (or all are empty)")
        if not any(p.requires_grad for p in picked):
            raise ValueError("every parameter the mask selected is frozen (requires_grad=False): nothing to perturb")
        self.sparsity = 1 - sum(p.numel() for p in picked) / self.numel  # the fraction left unperturbed

    def compute(self, params: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        chosen = {id(p) for p in self.selected}
        return [torch.full_like(p, id(p) in chosen, dtype=torch.bool) for p in params]

    def check_state(self, state: object) -> None:
        """As :meth:`Mask.check_state`, and the saved masks must be this mask's selection."""
        super().check_state(state)
        saved = state["masks"]  # type: ignore[index]
        if saved is not None and any(
            not torch.equal(m.to(e.device, torch.bool), e)
            for m, e in zip(saved, self.compute(self._bound(), []), strict=True)
        ):
            raise ValueError("the saved masks are not this SelectMask's selection: build it with the same select")


def sam_on(model: nn.Module, *, norm_layers: tuple[type[nn.Module], ...] = NORM_LAYERS, **kwargs: Any) -> SelectMask:
    """SAM-ON's mask: only the affine parameters of the normalisation layers are perturbed.

    Mueller, Vlaar, Rolnick and Hein, "Normalization Layers Are All That Sharpness-Aware
    Minimization Needs", NeurIPS 2023, arXiv:2306.04226 (official code mueller-mp/SAM-ON,
    which selects by parameter name; here by module type, ``norm_layers``). With SAM or
    element-wise ASAM (``adaptive=True``); the paper uses a much larger ``rho`` than SAM's.
    ``kwargs`` go to :class:`SelectMask`.

    Example::

        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, mask=samopt.masks.sam_on(model), lr=0.1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, norm_layers) and any(True for _ in m.parameters(recurse=False)) for m in model.modules()):
        names = ", ".join(t.__name__ for t in norm_layers)
        raise ValueError(
            f"sam_on: the model has no normalisation layer with affine parameters (looked for {names}); "
            "pass norm_layers= with your model's normalisation classes"
        )
    return SelectMask(model, lambda module, name: isinstance(module, norm_layers), **kwargs)


#: Allowed values of :class:`FisherMask`'s ``fisher_labels``.
FISHER_LABELS = ("true", "sampled")


class FisherMask(Mask):
    """SSAM-F: perturb the entries with the largest empirical Fisher information.

    The score of each weight is ``sum_i (d loss_fn(model(x_i), y_i) / dw)^2`` over
    ``num_samples`` training examples (Mi et al., NeurIPS 2022, arXiv:2210.05177),
    and the mask keeps the global top ``floor(N * (1 - sparsity))``. Per-example
    gradients are vectorised (:func:`samopt.per_sample.per_sample_grads`) in chunks
    of at most ``chunk_size`` examples (see ``vectorize``). The pass leaves the model's gradients,
    train/eval mode, buffers (BatchNorm running statistics) and the global RNG
    exactly as they were; it runs in the model's current mode, so in training mode
    BatchNorm normalises each example by its own statistics, as the official
    batch-1 loop does.

    Differences from the official code, each deliberate: the first mask is computed
    before the first step (not all-zero, which leaves step 1 unperturbed), the
    interval counts optimizer steps (not epochs) and the new mask applies at once,
    no leftover gradient leaks into the first sample's score, and BatchNorm
    statistics are not disturbed.

    Args:
        model: the module whose parameters the optimizer holds (a
            ``DistributedDataParallel`` wrapper is unwrapped: its ``.module`` is used).
        fisher_data: a re-iterable of ``(inputs, targets)`` batches (inputs a tensor, or a mapping of tensors
            passed as keyword arguments as Hugging Face models take them), e.g. a DataLoader
            over the training set (its own, not the training loop's if that one has
            ``persistent_workers=True``, whose single iterator the two would share).
            Examples are taken in order across batches; the iterator is resumed at
            the next update and re-created when exhausted. Its shuffling and
            augmentation draw from the mask's private random stream, so the global
            RNG is untouched and a resumed run (which fast-forwards to the saved
            position) sees the same examples if the data order is reproducible.
        loss_fn: ``loss_fn(outputs, targets)``, e.g. :func:`torch.nn.functional.cross_entropy`.
        sparsity, granularity, renormalize, skip_unperturbed, update_interval, seed: see :class:`Mask`.
        num_samples: examples per Fisher estimate (>= 1).
        fisher_labels: ``"true"`` (empirical Fisher, the paper and official code)
            or ``"sampled"`` (labels drawn from the model's predictive distribution,
            ``softmax(outputs)``, by the Gumbel-max trick with the mask's generator:
            the true Fisher; classification logits only).
        chunk_size: examples per chunk of per-example gradients; ``None`` bounds
            each chunk's gradients to 256 MiB.
        vectorize: ``True``: ``torch.func.vmap`` over each chunk; ``False``: a loop
            of batch-1 ``torch.autograd.grad`` calls (same results, same guarantees);
            ``None`` (default): vectorise on CUDA, loop on CPU, where
            ``benchmarks/fisher_cost.py`` measured the loop faster. ``vmap`` cannot
            run models with data-dependent Python control flow (Hugging Face
            attention-mask code, ``if x.sum() > 0``): with ``None`` the mask then
            warns once and uses the loop from then on; with ``True`` it raises.

    Example::

        mask = samopt.masks.FisherMask(model, train_loader, F.cross_entropy, sparsity=0.5,
                                       num_samples=128, update_interval=390)
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.05, momentum=0.9)
    """

    def __init__(
        self,
        model: nn.Module,
        fisher_data: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        sparsity: float = 0.5,
        *,
        num_samples: int = 128,
        update_interval: int | None = 390,
        fisher_labels: str = "true",
        granularity: str = "element",
        renormalize: bool | None = None,
        skip_unperturbed: bool = True,
        chunk_size: int | None = None,
        vectorize: bool | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            sparsity,
            granularity=granularity,
            renormalize=renormalize,
            skip_unperturbed=skip_unperturbed,
            update_interval=update_interval,
            seed=seed,
        )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(fisher_data, Iterable):
            raise TypeError(f"fisher_data must be an iterable of (inputs, targets) batches, got {fisher_data!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
        if isinstance(model, DistributedDataParallel):
            model = model.module  # the same parameters, called without DDP's per-backward all-reduce
        self.model, self.fisher_data, self.loss_fn = model, fisher_data, loss_fn
        self.num_samples = validation.positive_int("num_samples", num_samples)
        self.fisher_labels = validation.choice("fisher_labels", fisher_labels, FISHER_LABELS)
        self.chunk_size = validation.positive_int("chunk_size", chunk_size, allow_none=True)
        self.vectorize = None if vectorize is None else validation.boolean("vectorize", vectorize)
        self._iter: Iterator[Any] | None = None
        self._carry: tuple[Inputs, Tensor] | None = None  # unused rest of the last batch
        self.position = 0  # examples consumed from the current pass over fisher_data
        self._skip = 0  # examples to skip when the iterator is re-created after load_state_dict
        self._names: list[str] = []
        self._vmap_failed = False  # vectorize=None fell back to the loop once: stay there

    def bind(
        self, params: Sequence[Tensor], owner: object, group: dist.ProcessGroup | None = None, *, sharded: bool = False
    ) -> None:
        super().bind(params, owner, group, sharded=sharded)
        names = {id(p): n for n, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(self.params) if id(p) not in names]  # type: ignore[arg-type]
        if missing:
            raise ValueError(
                f"FisherMask: {len(missing)} optimizer parameter(s) (indices {missing[:5]}) are not parameters of "
                "the model given as model=; the Fisher information is taken over model.named_parameters()"
            )
        self._names = [names[id(p)] for p in self.params]  # type: ignore[union-attr]

    # ---------------------------------------------------------------------- data

    def _batch(self) -> tuple[Inputs, Tensor]:
        """The next ``(inputs, targets)`` batch, re-creating the iterator after a full pass."""
        for restarted in (False, True):
            if self._iter is None:
                self._iter = iter(self.fisher_data)
                self.position = 0
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                if restarted:
                    break
                continue
            if not (
                isinstance(batch, (tuple, list))
                and len(batch) == 2
                and torch.is_tensor(batch[1])
                and (
                    torch.is_tensor(batch[0])
                    or (isinstance(batch[0], Mapping) and batch[0] and all(map(torch.is_tensor, batch[0].values())))
                )
            ):
                kind = type(batch).__name__
                raise TypeError(
                    "fisher_data must yield (inputs, targets) pairs: inputs a tensor or a mapping of tensors, "
                    f"targets a tensor; got a {kind}"
                )
            n = inputs_len(batch[0])
            if n != batch[1].shape[0] or n == 0:
                raise ValueError(
                    f"fisher_data yielded a batch of {n} inputs and {batch[1].shape[0]} targets; "
                    "each batch needs as many targets as inputs, and at least one"
                )
            return batch[0], batch[1]
        raise ValueError(
            "fisher_data yielded no batches: it needs at least one (inputs, targets) batch, and must be "
            "re-iterable (a DataLoader or a list, not a one-shot iterator) to serve more than one pass"
        )

    def samples(self, n: int) -> tuple[Inputs, Tensor]:
        """The next ``n`` examples of ``fisher_data``, in order across batches."""
        xs, ys, have = [], [], 0
        while have < n:
            if self._carry is not None:
                x, y = self._carry
                self._carry = None
            else:
                x, y = self._batch()
                if self._skip:  # fast-forward to where a saved run stopped
                    drop = min(self._skip, len(y))
                    self._skip -= drop
                    self.position += drop
                    x, y = inputs_index(x, slice(drop, None)), y[drop:]
            take = min(n - have, len(y))
            if take < len(y):
                self._carry = (inputs_index(x, slice(take, None)), y[take:])
            xs.append(inputs_index(x, slice(None, take)))
            ys.append(y[:take])
            have += take
            self.position += take
        return inputs_cat(xs), torch.cat(ys)

    # ------------------------------------------------------------------- scores

    def scores(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The Fisher score of every entry of ``params``, from the next ``num_samples`` examples."""
        device = params[0].device
        chunk = self.chunk_size or min(self.num_samples, chunk_size_for(params, FISHER_CHUNK_BYTES))
        seed = int(torch.randint(1 << 62, (), generator=self.generator, device=self.generator.device))  # type: ignore[union-attr]
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        # data shuffling and augmentation, dropout and label sampling draw from a private
        # stream seeded by the mask's generator; the global RNG is left as it was
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[cuda[0]].manual_seed(seed)
            x, y = self.samples(self.num_samples)
            x, y = inputs_map(x, lambda t: t.to(device)), y.to(device)
            rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]
            auto = _vectorize_default(device) and not self._vmap_failed
            vectorize = auto if self.vectorize is None else self.vectorize
            try:
                self._accumulate(acc, x, y, chunk, vectorize)
            except RuntimeError as err:
                if not vectorize:
                    raise
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
                if self.vectorize:
                    raise RuntimeError(
                        f"FisherMask(vectorize=True): torch.func.vmap could not compute per-example gradients ({why}); "
                        "pass vectorize=False (a loop of batch-1 passes, same results) or vectorize=None "
                        "(try vmap, fall back to the loop)"
                    ) from err
                warnings.warn(
                    f"FisherMask: torch.func.vmap could not compute per-example gradients ({why}); using the loop of "
                    "batch-1 passes from now on (vectorize=False skips the attempt)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._vmap_failed = True
                for a in acc:
                    a.zero_()
                torch.set_rng_state(rng[0])  # the loop draws what it draws with vectorize=False
                for d, state in zip(cuda, rng[1], strict=True):
                    torch.cuda.set_rng_state(state, d)
                self._accumulate(acc, x, y, chunk, False)
        return acc

    def _accumulate(self, acc: list[Tensor], x: Inputs, y: Tensor, chunk: int, vectorize: bool) -> None:
        """Adds the squared per-example gradients of ``(x, y)`` to ``acc``."""
        target = _sample_label if self.fisher_labels == "sampled" else None
        for grads in per_sample_grads(
            self.model, self._names, x, y, self.loss_fn, chunk_size=chunk, label=target, vectorize=vectorize
        ):
            for a, g in zip(acc, grads, strict=True):
                for gi in g:  # one fused pass per example
                    gi = (gi.abs() if gi.is_complex() else gi).float()  # |g|^2 of a complex entry
                    a.addcmul_(gi, gi)

    def compute(self, params: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        scores = self.scores(params)
        D.all_reduce_(scores, "sum", self.group)  # the Fisher over every rank's examples
        return select_top(scores, keep_count(self.numel, self.sparsity), granularity=self.granularity)

    def state_dict(self) -> dict[str, Any]:
        # examples of the current pass consumed, counting those still to be skipped after a load
        return {**super().state_dict(), "position": self.position + self._skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._iter, self._carry = None, None
        self.position, self._skip = 0, int(state["position"])


def _vectorize_default(device: torch.device) -> bool:
    """Whether ``vectorize=None`` tries ``vmap`` on ``device``: on CUDA only (see :class:`FisherMask`)."""
    return device.type == "cuda"


def _sample_label(logits: Tensor) -> Tensor:
    """A class drawn from ``softmax(logits)`` (Gumbel-max), from the current RNG stream."""
    u = torch.rand_like(logits, dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    return (logits.detach().float() - torch.log(-torch.log(u))).argmax(-1)


#: Allowed values of :class:`DynamicSparseMask`'s ``drop`` and ``grow``.
DROP_SCORES = ("gradient", "weight", "random")
GROW_SCORES = ("random", "gradient")


class DynamicSparseMask(Mask):
    """SSAM-D: a random mask evolved by drop and grow, as in dynamic sparse training.

    Starts from a random mask with exactly ``K = floor(N * (1 - sparsity))`` live
    entries. Every ``update_interval`` steps ``t``, with drop rate
    ``dr = drop_rate * (1 + cos(pi * min(t, total_steps) / total_steps)) / 2``
    (Mi et al., NeurIPS 2022, arXiv:2210.05177), it keeps the
    ``floor(N * (1 - sparsity) * (1 - dr))`` live entries with the largest drop
    score and grows entries among those that were dead, by the grow score, until
    exactly ``K`` are live again (if too few were dead, just-dropped entries
    regrow, best grow score first). Runs on the parameters' device. With
    ``granularity="tensor"`` whole tensors are kept (by mean drop score) and grown
    (by mean grow score) greedily within the same budgets, so the live count can
    fall below ``K``.

    Differences from the official code (Mi et al.'s SSAM repository, ``DynamicSparseMask``
    in its optimizer):

    - **Density.** Here the live count stays exactly ``K``. There it falls: entries
      dropped in an update cannot regrow in the same update, and the growth budget is
      capped by the number of entries that were already dead. With its defaults
      (sparsity 0.2, drop rate 0.5) the density falls to about 0.59 against a target
      of 0.80. That loss is structural, not rounding.
    - **Timing.** The official code drops and grows at step 0 as well, and applies
      each new mask one step later: it perturbs with the old mask, then updates it.
      samopt keeps the initial random mask until the first update is due, and applies
      a new mask at once, in the step that computes it.
    - **Scores and device.** The ``"weight"`` score is ``|w|`` at ``w`` (there,
      ``|w + e|``, since the weights are already perturbed when it scores them), and
      nothing is copied to the CPU.

    Args:
        sparsity, granularity, renormalize, skip_unperturbed, update_interval, seed: see :class:`Mask`.
        drop_rate: the initial drop rate ``alpha``, in [0, 1].
        drop: drop score, ``"gradient"`` (``|g|`` at ``w``: drop the flattest),
            ``"weight"`` (``|w|``) or ``"random"``.
        grow: grow score, ``"random"`` or ``"gradient"`` (``|g|``).
        total_steps: length of the cosine schedule of the drop rate, in steps.

    Example::

        mask = samopt.masks.DynamicSparseMask(0.5, update_interval=390, total_steps=78000)
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.05)
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        total_steps: int,
        drop_rate: float = 0.5,
        drop: str = "gradient",
        grow: str = "random",
        update_interval: int | None = 390,
        granularity: str = "element",
        renormalize: bool | None = None,
        skip_unperturbed: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            sparsity,
            granularity=granularity,
            renormalize=renormalize,
            skip_unperturbed=skip_unperturbed,
            update_interval=update_interval,
            seed=seed,
        )
        self.total_steps = validation.positive_int("total_steps", total_steps)
        self.drop_rate = validation.unit_interval("drop_rate", drop_rate, include_one=True)
        self.drop = validation.choice("drop", drop, DROP_SCORES)
        self.grow = validation.choice("grow", grow, GROW_SCORES)

    def drop_rate_at(self, step: int) -> float:
        """The cosine-decayed drop rate at ``step`` (0 once ``total_steps`` is reached)."""
        t = min(step, self.total_steps)
        return self.drop_rate * (1 + math.cos(math.pi * t / self.total_steps)) / 2

    def _score(self, kind: str, params: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        if kind == "random":
            return self._rand(params)
        if kind == "weight":
            return [p.detach().abs() for p in params]
        scores = [torch.zeros_like(p) if g is None else g.detach().abs() for p, g in zip(params, grads, strict=True)]
        D.all_reduce_(scores, "mean", self.group)  # differs across ranks with sync="local"
        return scores

    def compute(self, params: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        budget = keep_count(self.numel, self.sparsity)
        if self.masks is None:  # the initial random mask
            return select_top(self._score("random", params, grads), budget, granularity=self.granularity)
        live = self.masks
        keep = keep_count(self.numel, self.sparsity, 1 - self.drop_rate_at(self.steps))
        kept = select_top(self._score(self.drop, params, grads), keep, granularity=self.granularity, eligible=live)
        kept_n = sum(int(m.sum()) for m in kept)
        grow_scores = self._score(self.grow, params, grads)
        dead = [~m for m in live]
        dead_n = sum(int(m.sum()) for m in dead)
        need = budget - kept_n
        if self.granularity == "tensor":
            dead_n = sum(m.numel() for m in dead if bool(m.all()) and m.numel())
        grown = select_top(grow_scores, min(need, dead_n), granularity=self.granularity, eligible=dead)
        new = [k | g for k, g in zip(kept, grown, strict=True)]
        need -= sum(int(g.sum()) for g in grown)
        if need > 0 and self.granularity == "element":  # too few were dead: regrow just-dropped entries
            dropped = [m & ~k for m, k in zip(live, kept, strict=True)]
            regrown = select_top(grow_scores, need, eligible=dropped)
            new = [n | r for n, r in zip(new, regrown, strict=True)]
        return new

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, drop_rate={self.drop_rate}, drop={self.drop!r}, grow={self.grow!r}, "
            f"total_steps={self.total_steps})"
        )
