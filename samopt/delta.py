"""δ-SAM: SAM whose ascent gradient reweights the examples of the batch.

Zhou, Liu, Zhang, Chen, "Sharpness-Aware Minimization with Dynamic Reweighting",
Findings of EMNLP 2022, arXiv:2112.08772. Per-instance SAM gives every example its
own worst-case perturbation, which is stronger than SAM's shared one but needs one
pass per example. δ-SAM keeps SAM's two passes and builds the shared perturbation
from a weighted loss ``sum_i lambda_i l_i`` whose weights are recomputed every batch
from a cheap estimate of each example's gradient norm.

The form of the weights is derived here, not taken from the paper, whose public text
does not fix it: with nearly orthogonal per-example gradients ``g_i``, the shared
``e`` that gives every example the same first-order loss increase is
``e ∝ sum_i g_i / ||g_i||``, i.e. ``lambda_i ∝ 1 / ||g_i||``. The exponent is
therefore an option, ``alpha``:

    lambda_i ∝ (s_i + kappa)^(-alpha),   normalised to sum 1, capped at clip / n,

with ``s_i`` an estimate of ``||g_i||`` and ``kappa = kappa_rel * median(s)``;
``alpha = 1`` is that reading, ``alpha = 0`` is SAM (bit for bit), negative
``alpha`` up-weights the examples with the largest gradients. Which sign brings SAM
closer to per-instance SAM was measured per task (``benchmarks/delta_alignment.py``).
:func:`delta_weights` is the pure function, :class:`DeltaWeights` the ascent policy
(:mod:`samopt.seams`) that carries the settings and the probes' random stream, and
:class:`DeltaSAM` the optimizer that drives the engine with per-example losses.

Example::

    opt = samopt.DeltaSAM(model.parameters(), torch.optim.AdamW, rho=0.05, estimator="logit", lr=2e-5)

    def closure():                      # per-example losses, no backward
        logits = model(x)
        return F.cross_entropy(logits, y, reduction="none"), logits

    loss = opt.step(closure)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from samopt import validation
from samopt.bn import BufferGuard
from samopt.per_sample import chunk_size_for
from samopt.sam import SAM, NonFiniteGradientError
from samopt.seams import AroundAscent, Ascent, take_keywords

__all__ = ["ESTIMATORS", "DeltaSAM", "DeltaWeights", "delta_weights"]

#: Allowed values of ``estimator``.
ESTIMATORS = ("probe", "logit", "exact")
#: Memory bound for one chunk of per-example gradients of the ``"exact"`` estimator.
EXACT_CHUNK_BYTES = 256 << 20
#: ... and on its examples (each also carries a batch-sized set of activation gradients).
EXACT_CHUNK = 8

LossClosure = Callable[[], Any]


def delta_weights(scores: Tensor, alpha: float, *, clip: float | None = 5.0, kappa_rel: float = 1e-3) -> Tensor:
    """δ-SAM's per-example weights ``lambda_i ∝ (s_i + kappa)^(-alpha)``, summing to 1.

    ``kappa = kappa_rel * median(scores)`` keeps near-zero scores from taking all
    the weight (a zero is treated as the smallest positive float, so the weights stay
    finite whatever ``alpha``); with ``clip`` no weight exceeds ``clip / n``: the
    excess of capped weights is redistributed over the others in proportion, until
    none is above the cap. Zhou et al., EMNLP Findings 2022, arXiv:2112.08772, as
    reconstructed in the module docstring.

    Example::

        lam = delta_weights(torch.tensor([0.5, 1.0, 2.0]), alpha=1.0, clip=None)   # ∝ [2, 1, 0.5]
    """
    s = scores.detach().double()
    n = s.numel()
    if n == 0:
        return s.float()
    base = (s + kappa_rel * s.median()).clamp_min(torch.finfo(torch.float64).tiny)
    lam = torch.softmax(-alpha * base.log(), 0)  # ∝ base^-alpha, computed without overflow
    if clip is not None:
        # Capping the largest weights one at a time and sharing the excess in proportion keeps the order, so the
        # result caps the k largest and scales the rest by f_k = (1 - k cap) / (their sum), for the first k at
        # which the largest of the rest fits under the cap; found on the device, without a loop.
        cap = clip / n
        ordered, order = lam.sort(descending=True, stable=True)
        rest = ordered.flip(0).cumsum(0).flip(0)
        k = torch.arange(n, dtype=lam.dtype, device=lam.device)
        factor = (1 - k * cap) / rest
        fits = ordered * factor <= cap
        fits[-1] = True  # the last always fits (n cap = clip >= 1), whatever the rounding
        first = fits.int().argmax()
        shared = torch.where(k < first, cap, ordered * factor.gather(0, first.reshape(1)))
        lam = torch.empty_like(lam).scatter_(0, order, shared)
    return lam.to(torch.float32)


class DeltaWeights(AroundAscent):
    """δ-SAM's per-example weights on the ascent gradient: an ascent policy around another one.

    The perturbation itself is ``inner``'s (SAM's by default, or a :mod:`samopt.masks`
    mask), built from the gradient of ``sum_i lambda_i l_i`` instead of the mean loss;
    :class:`DeltaSAM` computes that gradient with :meth:`weights`. The arguments are
    :class:`DeltaSAM`'s. The state is the probes' random stream and ``inner``'s.
    """

    def __init__(
        self,
        inner: Ascent | None = None,
        *,
        estimator: str = "probe",
        num_probes: int = 3,
        sigma: float | None = None,
        alpha: float = -1.0,
        clip: float | None = 5.0,
        kappa_rel: float = 1e-3,
        seed: int | None = None,
    ) -> None:
        super().__init__(inner)
        self.estimator = validation.choice("estimator", estimator, ESTIMATORS)
        self.num_probes = validation.positive_int("num_probes", num_probes)
        self.sigma = validation.positive_or_none("sigma", sigma)
        self.alpha = validation.finite("alpha", alpha, "a finite real number (0 is SAM, 1 the inverse-norm weights)")
        self.clip = validation.positive_or_none("clip", clip)
        if self.clip is not None and self.clip < 1:
            raise ValueError(f"clip must be None or a real number >= 1 (a cap of clip / n per weight), got {clip!r}")
        self.kappa_rel = validation.nonnegative("kappa_rel", kappa_rel)
        validation.seed_or_none("seed", seed)
        self.seed = torch.initial_seed() if seed is None else seed
        self.generator: torch.Generator | None = None

    def weights(self, scores: Tensor) -> Tensor:
        """``lambda`` from the per-example norm estimates ``scores`` (:func:`delta_weights`)."""
        return delta_weights(scores, self.alpha, clip=self.clip, kappa_rel=self.kappa_rel)

    def bind(self, params: list[Tensor], owner: object, group: Any = None, *, sharded: bool = False) -> None:
        if sharded:
            raise ValueError("DeltaSAM over FSDP-sharded (DTensor) parameters is not supported; use DDP")
        if self.generator is None:
            self.generator = torch.Generator(device=params[0].device)
            self.generator.manual_seed(self.seed)
        super().bind(params, owner, group, sharded=sharded)

    @property
    def skips_clean_grads(self) -> bool:
        return False

    def clean_params(self) -> list[Tensor] | None:
        """Every parameter: the estimators read the whole gradient at ``w`` (a tensor mask saves nothing here)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator().get_state(), "inner": self.inner.state_dict()}

    def check_state(self, state: object) -> None:
        mine = self._generator().get_state()
        saved = state.get("generator") if isinstance(state, dict) else None
        if not torch.is_tensor(saved) or saved.dtype != mine.dtype or saved.shape != mine.shape:
            raise ValueError(
                f"the state_dict's delta_generator does not fit this DeltaSAM's generator on "
                f"{self._generator().device} (missing, or saved on another device type)"
            )
        self.inner.check_state(state["inner"])  # type: ignore[index]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._generator().set_state(state["generator"])
        self.inner.load_state_dict(state["inner"])

    def state_from_format1(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {"generator": meta.get("delta_generator"), "inner": self.inner.state_from_format1(meta)}

    def _generator(self) -> torch.Generator:
        if self.generator is None:
            raise RuntimeError("DeltaWeights is not attached to an optimizer: DeltaSAM attaches it")
        return self.generator

    def __repr__(self) -> str:
        return (
            f"DeltaWeights(inner={self.inner!r}, estimator={self.estimator!r}, num_probes={self.num_probes}, "
            f"alpha={self.alpha}, clip={self.clip})"
        )


_STEP_ONLY = (
    "DeltaSAM builds its ascent gradient from per-example losses, which only step(closure) computes; "
    "drive it with opt.step(closure) (the closure returns the per-example losses without backward)"
)


class DeltaSAM(SAM):
    """δ-SAM: the ascent gradient is that of ``sum_i lambda_i l_i``, weights from per-example norm estimates.

    Zhou, Liu, Zhang and Chen, Findings of EMNLP 2022, arXiv:2112.08772; the form of the
    weights is derived in this module's docstring (the paper's public text does not fix it).

    The optimizer owns the backward passes: the closure runs the forward and
    returns the per-example losses, shape ``(batch,)``, without calling
    ``backward()`` (or ``(losses, logits)`` for the ``"logit"`` estimator). One
    :meth:`step` runs the closure at ``w``, estimates ``s_i``, back-propagates the
    weighted loss, moves to ``w + e`` (:meth:`SAM.first_step`), runs the closure
    there and back-propagates the plain mean loss (or the weighted one with
    ``reweight_descent=True``), and steps the base optimizer
    (:meth:`SAM.second_step`). Everything the engine guarantees (BatchNorm, AMP
    with ``scaler=``, clipping, resume, errors) holds.

    The keywords of :class:`DeltaWeights` (the ones below but ``reweight_descent``) build
    the weights policy; all others go to :class:`samopt.SAM`.

    Args:
        params, base_optimizer, rho, **kwargs: as :class:`samopt.SAM` (``adaptive``,
            ``bn``, ``max_grad_norm`` and the base optimizer's keywords).
        mask: a :mod:`samopt.masks` mask: the weighted ascent gradient then perturbs its live entries only.
        estimator: how ``s_i ≈ ||grad l_i||`` is obtained. For classification,
            ``"logit"`` measured as close to per-instance SAM as ``"exact"`` and at
            SAM's cost; ``"probe"`` is the default because it needs only the losses.

            - ``"probe"`` (the paper's kind): ``num_probes`` forward-only passes at
              ``w + sigma z_k`` with Gaussian ``z_k``, ``s_i = sqrt(mean_k ((l_i(w +
              sigma z_k) - l_i(w)) / sigma)^2)`` (``E[(g.z)^2] = ||g||^2``). The probes
              run before the clean pass, with its dropout masks, compute differences
              in fp32, and leave weights, buffers, gradients and the global RNG as
              they were. The probes move the weights by ``rho / sqrt(#params)`` and the
              losses by about ``rho ||g|| / sqrt(#params)``: under fp16/bf16 autocast
              both fall below the rounding (on a 50k-parameter CNN as on MiniLM, the
              bf16 estimates were further from the true norms than equal weights),
              so use ``"logit"`` there.
            - ``"logit"``: the exact norm of the gradient of ``l_i`` with respect to
              its own logits (``||softmax(z_i) - onehot(y_i)||`` for cross-entropy),
              from the clean pass's graph, at almost no cost. The closure must
              return ``(losses, logits)``: the logits the losses were computed from,
              or a list of them, one per chunk of the batch (per micro-batch, in
              order), when the losses of each chunk come from its own forward.
            - ``"exact"``: the true per-example gradient norms, from one batched
              (``vmap``) backward per chunk of examples through the clean graph.
              Slow and memory-hungry; for validation and small models.
        num_probes: ``K`` for ``"probe"`` (>= 1).
        sigma: probe scale; ``None`` means ``rho / sqrt(number of parameters)``, so
            that ``||sigma z||`` is about ``rho``.
        alpha: exponent of the weights (finite); 0 is SAM bit for bit. Which sign
            brings the update closer to per-instance SAM depends on the task
            (``benchmarks/delta_alignment.py``, docs/benchmarks.md): on GLUE MRPC with
            MiniLM (the paper's setting) ``alpha = -1`` did (+0.11 cosine over SAM)
            and positive values moved away; on a Fashion-MNIST CNN ``alpha`` 0.5 to 1
            did (+0.05 to +0.08) and -1 moved away. The default -1 follows the
            paper's setting; measure on your task.
        clip: cap on each weight as a multiple of ``1 / n`` (>= 1), or ``None``.
        kappa_rel: offset of the scores relative to their median (>= 0).
        reweight_descent: also weight the loss of the perturbed pass.
        seed: seed of the probes' private generator (``None``: ``torch.initial_seed()``);
            its state is in :meth:`state_dict`.

    After a step, ``opt.last_scores`` and ``opt.last_weights`` hold ``s`` and ``lambda``.
    A non-finite estimate without a scaler is a non-finite step: its update is skipped and
    :class:`~samopt.NonFiniteGradientError` reports it (at a later step, or in the step with
    ``check="eager"``, as for a non-finite gradient); with an enabled ``scaler`` (an fp16
    overflow) that step uses uniform weights instead (the plain mean loss; ``last_weights``
    is ``1 / n``) and the scaler skips the update if the gradients overflow as well.

    Example::

        opt = samopt.DeltaSAM(model.parameters(), torch.optim.AdamW, rho=0.05, estimator="probe",
                              num_probes=3, alpha=1.0, clip=5.0, lr=2e-5, weight_decay=0.01)
        loss = opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    """

    per_example = True
    _state_kind = "DeltaSAM"

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        *,
        mask: Ascent | None = None,
        reweight_descent: bool = False,
        **kwargs: Any,
    ) -> None:
        if "ascent" in kwargs:
            raise TypeError("DeltaSAM's ascent policy is its DeltaWeights; give another one's mask as mask=")
        if kwargs.get("schedule") is not None:
            raise TypeError(
                "DeltaSAM takes no schedule: its clean backward is of the reweighted loss, so a step that did not "
                "ascend would update with the reweighted gradient instead of the plain one; use SAM for a schedule"
            )
        weights = DeltaWeights(mask, **take_keywords(DeltaWeights, kwargs))
        self.reweight_descent = validation.boolean("reweight_descent", reweight_descent)
        super().__init__(params, base_optimizer, rho, ascent=weights, **kwargs)
        self.mask = mask
        self.weights = weights
        self._probe_guard = BufferGuard()  # the clean graph still holds BN's buffers
        self.last_scores: Tensor | None = None
        self.last_weights: Tensor | None = None

    @property
    def estimator(self) -> str:
        return self.weights.estimator

    @property
    def alpha(self) -> float:
        return self.weights.alpha

    @property
    def clip(self) -> float | None:
        return self.weights.clip

    @property
    def num_probes(self) -> int:
        return self.weights.num_probes

    # ----------------------------------------------------------------- closure

    def _losses(self, out: Any, *, need_logits: bool) -> tuple[Tensor, list[Tensor] | None]:
        """The closure's per-example losses, and its logits as a list of chunks (``None`` if it gave none)."""
        logits = None
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise TypeError(f"the closure must return losses or (losses, logits), got a {len(out)}-tuple")
            out, logits = out
            logits = list(logits) if isinstance(logits, (list, tuple)) else [logits]
        if not torch.is_tensor(out) or out.dim() != 1 or out.numel() == 0:
            what = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else type(out).__name__
            raise ValueError(
                "the closure must return the per-example losses, a 1-D tensor of shape (batch,) "
                f"(e.g. F.cross_entropy(..., reduction='none')), without calling backward(); got {what}"
            )
        if need_logits and (
            not logits
            or not all(torch.is_tensor(z) and z.dim() > 0 for z in logits)
            or (sum(z.shape[0] for z in logits) != out.shape[0])
        ):
            raise ValueError(
                'estimator="logit" needs the closure to return (losses, logits) with logits of shape (batch, ...), '
                "or a list of the logits of consecutive chunks of the batch"
            )
        return out, logits

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    # -------------------------------------------------------------- estimators

    def _estimate(self, losses: Tensor, logits: list[Tensor] | None, probes: list[Tensor]) -> Tensor:
        if self.estimator == "logit":
            grads = None
            if logits is not None and all(z.requires_grad for z in logits):
                grads = torch.autograd.grad(losses.sum(), logits, retain_graph=True, allow_unused=True)
            if grads is None or any(g is None for g in grads):
                raise ValueError(
                    'estimator="logit": the closure must return the logits the losses were computed from '
                    "(for losses from several forwards, the list of their logits, not their concatenation)"
                )
            return torch.cat([g.detach().float().reshape(g.shape[0], -1).norm(dim=1) for g in grads])
        if self.estimator == "exact":
            return self._exact_norms(losses)
        clean = losses.detach().float()
        sq = torch.zeros_like(clean)
        for probe in probes:
            if probe.shape != clean.shape:
                raise ValueError(
                    f"the closure returned {tuple(probe.shape)} losses in a probe pass, {tuple(clean.shape)} at w"
                )
            sq += ((probe.float() - clean) / self._sigma()).square()
        return (sq / len(probes)).sqrt()

    def _exact_norms(self, losses: Tensor) -> Tensor:
        params = self._params()
        n = losses.shape[0]
        sq = torch.zeros(n, dtype=torch.float64, device=losses.device)
        chunk = min(n, EXACT_CHUNK, chunk_size_for(params, EXACT_CHUNK_BYTES))
        eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
        for start in range(0, n, chunk):
            rows = eye[start : start + chunk]
            grads = torch.autograd.grad(
                losses, params, grad_outputs=rows, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
            for g in grads:
                if g is not None:
                    sq[start : start + chunk] += g.detach().double().reshape(g.shape[0], -1).square().sum(1)
        return sq.sqrt().float()

    def _sigma(self) -> float:
        if self.weights.sigma is not None:
            return self.weights.sigma
        rho = max(group["rho"] for group in self.param_groups)
        if rho == 0:
            raise ValueError("sigma=None means rho / sqrt(#parameters), and every rho is 0: set sigma")
        return rho / math.sqrt(sum(p.numel() for p in self._params()))

    @torch.no_grad()
    def _probe_losses(self, closure: LossClosure, rng: _RNG) -> list[Tensor]:
        """The per-example losses at ``w + sigma z_k`` for each probe, each replaying the RNG state ``rng``.

        Run before the clean pass, so that no autograd graph holds the parameters or
        buffers while they move. On return (or failure) the weights, buffers and the
        global RNG are as before, and the clean pass replays the same RNG state.
        """
        params, sigma = self._params(), self._sigma()

        generator = self.weights._generator()

        def noise(idx: list[int], out: list[Tensor] | None) -> None:
            for j, i in enumerate(idx):
                p = params[i]
                if out is None:
                    z = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
                    p.add_(z, alpha=sigma)
                else:
                    torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device, out=out[j])
                    out[j].mul_(sigma).add_(p)

        probes = []
        try:
            for _ in range(self.num_probes):
                self._probe_guard.start()
                try:
                    self.swap.move(params, noise)
                    rng.restore()  # every probe, and then the clean pass, draw the same dropout masks
                    probes.append(self._losses(closure(), need_logits=False)[0].detach())
                finally:
                    self.swap.restore()
                    self._probe_guard.restore()
        finally:
            rng.restore()
        return probes

    # -------------------------------------------------------------------- step

    def _backward(self, loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
        (loss if scaler is None or not scaler.is_enabled() else scaler.scale(loss)).backward()

    def step(self, closure: LossClosure | None = None, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One δ-SAM update; the closure returns per-example losses (no backward). Returns the mean loss at ``w``."""
        if closure is None or not callable(closure):
            raise ValueError(
                "DeltaSAM.step() needs a closure that runs the forward and returns the per-example losses "
                "(shape (batch,), no backward), or (losses, logits) for estimator='logit'"
            )
        if self._step is not None:
            raise RuntimeError("step() called between first_step() and second_step(); call second_step() first")
        self.zero_grad(set_to_none=True)
        with self.first_pass():  # DDP's no_sync() with sync="local": the probes, forward and backward at w
            probes: list[Tensor] = []
            if self.alpha != 0 and self.estimator == "probe":
                probes = self._probe_losses(closure, _RNG.of(self._params()))
                self.work.extra_forwards += len(probes)
            elif self.alpha != 0 and self.estimator == "exact":
                self.work.extra_passes += 1  # the per-example backward of _exact_norms
            with torch.enable_grad():
                losses, logits = self._losses(closure(), need_logits=self.estimator == "logit" and self.alpha != 0)
            lam = None
            if self.alpha == 0:
                objective = losses.mean()
            else:
                with torch.enable_grad():
                    scores = self._estimate(losses, logits, probes)
                finite = torch.isfinite(scores).all()
                unscaled = scaler is None or not scaler.is_enabled()
                if unscaled and self.check == "eager" and not bool(finite):
                    raise NonFiniteGradientError(
                        f"non-finite per-example norm estimate from estimator={self.estimator!r}; "
                        "the weights are unchanged"
                    )
                if unscaled:
                    self._flagged = ~finite  # the update is skipped on the device, and reported later
                # a non-finite estimate (an fp16 overflow with a scaler) falls back to the plain mean loss
                safe = torch.where(torch.isfinite(scores), scores, 1.0)
                lam = torch.where(finite, self.weights.weights(safe).to(losses.device), 1 / len(losses))
                self.last_scores, self.last_weights = scores, lam
                objective = (lam.to(losses.dtype) * losses).sum()
            self._backward(objective, scaler)
        with SAM.perturbed(self, scaler=scaler) as ascending:  # the engine's; DeltaSAM's own refuses users
            if ascending:
                with torch.enable_grad():
                    perturbed, _ = self._losses(closure(), need_logits=False)
                    if perturbed.shape != losses.shape:
                        raise ValueError(
                            f"the closure returned {tuple(perturbed.shape)} losses at w + e, {tuple(losses.shape)} at w"
                        )
                    descent = (
                        (lam.to(perturbed.dtype) * perturbed).sum()
                        if self.reweight_descent and lam is not None
                        else perturbed.mean()
                    )
                    self._backward(descent, scaler)
        return losses.detach().mean()

    def first_step(self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Not for δ-SAM: its ascent gradient is that of the weighted per-example losses, which only
        :meth:`step` computes; through the two-phase API it would silently be plain SAM."""
        raise TypeError(_STEP_ONLY)

    def perturbed(self, scaler: torch.amp.GradScaler | None = None, zero_grad: bool = False) -> Any:
        """Not for δ-SAM, as :meth:`first_step`: the gradients a loop of one's own leaves in ``.grad`` are those
        of the unweighted loss."""
        raise TypeError(_STEP_ONLY)


class _RNG:
    """The global CPU RNG state and that of the CUDA devices in use, to replay or restore."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @classmethod
    def of(cls, params: list[Tensor]) -> _RNG:
        return cls(sorted({p.device.index or 0 for p in params if p.device.type == "cuda"}))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, d)
