"""Sharpness diagnostics: the curvature of a model's training loss, measured without changing the model.

- :func:`top_eigenvalues`: the largest Hessian eigenvalues by power iteration with
  deflation over Hessian-vector products (as PyHessian, Yao et al., "PyHessian: Neural
  Networks Through the Lens of the Hessian", IEEE BigData 2020, arXiv:1912.07145, does),
  with a relative tolerance and the iterations reported;
- :func:`hessian_trace`: Hutchinson's estimate ``E[z^T H z]`` over Rademacher probes,
  with its standard error;
- :func:`m_sharpness`: worst-case (adaptive) m-sharpness, the largest loss increase in a
  ball of radius ``rho`` around the weights, per batch of size m, found by projected
  gradient ascent (Andriushchenko et al., ICML 2023, arXiv:2302.07011; their code is
  tml-epfl/sharpness-vs-generalization);
- :func:`average_sharpness`: the mean loss increase under Gaussian weight noise;
- :func:`filter_normalized_direction`, :func:`landscape`, :func:`interpolation`: the loss
  along 1-D and 2-D slices through the weights in random filter-normalised directions
  (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018,
  arXiv:1712.09913) and along the line between two sets of weights.

The loss is the mean, over a fixed list of ``batches`` (each counting equally), of
``loss_fn(model, batch)``. Every measure runs with an explicit BatchNorm mode
(``bn="train"``: batch statistics, as in training; ``"eval"``: the running statistics)
and with dropout off, so that the loss is a deterministic function of the weights; the
model's weights, buffers, gradients, ``requires_grad`` flags, training modes and the
global RNG are as they were afterwards. Hessian-vector products are double-backward
passes (one forward and two backward passes per batch).

Sharpness does not always track generalisation: Andriushchenko et al., "A Modern Look
at the Relationship between Sharpness and Generalization", ICML 2023, arXiv:2302.07011,
find it correlated with training parameters such as the learning rate rather than with
test error; compare only within a controlled family of runs.

Example::

    loss_fn = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    top = samopt.diagnostics.top_eigenvalues(model, loss_fn, batches, k=2)
    top.values, top.iterations          # e.g. [31.2, 17.9], [14, 23]
    tr = samopt.diagnostics.hessian_trace(model, loss_fn, batches, probes=50)
    tr.value, tr.stderr
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from samopt import validation

__all__ = [
    "BN_MODES",
    "HVP_METHODS",
    "NORMS",
    "TRACE_ESTIMATORS",
    "Eigenvalues",
    "Estimate",
    "Landscape",
    "Sharpness",
    "average_sharpness",
    "filter_normalized_direction",
    "hessian_trace",
    "hvp",
    "interpolation",
    "landscape",
    "m_sharpness",
    "preserved",
    "top_eigenvalues",
]

#: Allowed values of ``bn``: BatchNorm with the batch's statistics (as in training) or its running ones.
BN_MODES = ("train", "eval")
#: ``loss_fn(model, batch) -> scalar``: the training loss of one batch.
LossFn = Callable[[nn.Module, Any], Tensor]
#: ``progress(n)``: ``n`` more units of work done (for a progress bar such as ``tqdm.update``).
Progress = Callable[[int], None]
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class Eigenvalues:
    """The result of :func:`top_eigenvalues`: largest first."""

    values: list[float]
    iterations: list[int]  # power iterations each eigenvalue took
    converged: list[bool]  # whether its relative change fell below ``tol`` within ``max_iter``
    hvps: int  # Hessian-vector products over the whole set of batches


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate: its mean, its standard error, the samples it averages (for Hutch++ the Hutchinson
    third's) and the Hessian-vector products it took."""

    value: float
    stderr: float
    samples: int
    hvps: int


@contextlib.contextmanager
def preserved(model: nn.Module, bn: str = "train", autocast: torch.dtype | None = None) -> Iterator[list[Tensor]]:
    """Run a measurement on ``model`` in BatchNorm mode ``bn`` with dropout off; everything is put back on leaving.

    ``autocast=torch.bfloat16`` (or ``torch.float16``) runs it under ``torch.autocast``
    on the parameters' device: the forward passes in that precision where autocast
    casts, the parameters and the vectors in theirs.

    Yields the parameters that require a gradient (the ones the Hessian is over). On
    leaving (also after an exception) the weights, buffers (BatchNorm's running
    statistics), ``.grad``, ``requires_grad`` flags, training modes and the CPU and
    CUDA RNG states are as they were.
    """
    validation.choice("bn", bn, BN_MODES)
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    flags = [p.requires_grad for p in params]
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.train(bn == "train")
        for m in model.modules():
            if isinstance(m, _DROPOUT):
                m.eval()
        device = params[0].device.type if params else "cpu"
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            yield [p for p in params if p.requires_grad]
    finally:
        with torch.no_grad():
            for p, w, g, f in zip(params, weights, grads, flags, strict=True):
                p.copy_(w)
                p.grad = g
                p.requires_grad_(f)
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


#: Allowed values of ``hvp_method``: double backward, or forward-mode over reverse-mode (``torch.func``).
HVP_METHODS = ("reverse", "forward")


class _Bound(nn.Module):
    """``loss_fn`` bound to ``model``, so that ``torch.func.functional_call`` can swap in the parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


@contextlib.contextmanager
def _frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm in training mode without updating its running statistics (an in-place update of a tensor
    captured by a ``torch.func`` transform is an error); the batch statistics are used as before."""
    tracking = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    try:
        for m in tracking:
            m.track_running_stats = False
        yield
    finally:
        for m in tracking:
            m.track_running_stats = True


def _hvp_forward(model: nn.Module, loss_fn: LossFn, batch: Any, params: list[Tensor], v: list[Tensor]) -> list[Tensor]:
    bound = _Bound(model, loss_fn)
    ids = {id(p): i for i, p in enumerate(params)}
    names = [f"model.{n}" for n, p in model.named_parameters() if id(p) in ids]
    order = [ids[id(p)] for p in model.parameters() if id(p) in ids]
    if len(names) != len(params):
        raise ValueError("params must be parameters of the model (each once) for hvp_method='forward'")

    def gradient(*ps: Tensor) -> tuple[Tensor, ...]:
        def loss(*qs: Tensor) -> Tensor:
            return torch.func.functional_call(bound, dict(zip(names, qs, strict=True)), (batch,))

        return torch.func.grad(loss, argnums=tuple(range(len(names))))(*ps)

    primals = tuple(params[i].detach() for i in order)
    tangents = tuple(v[i] for i in order)
    with _frozen_running_stats(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)  # torch.func's own
        hv = torch.func.jvp(gradient, primals, tangents)[1]
    out: list[Tensor] = [torch.empty(0)] * len(params)
    for i, h in zip(order, hv, strict=True):
        out[i] = h
    return out


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    params: list[Tensor],
    v: list[Tensor],
    *,
    method: str = "reverse",
) -> list[Tensor]:
    """``H v``, the Hessian of the mean batch loss over ``params`` times ``v``, batch by batch.

    ``method="reverse"``: double backward (a backward pass through the graph of the
    gradient); ``"forward"``: forward-mode differentiation of the reverse-mode gradient
    (``torch.func.jvp`` of ``torch.func.grad``; BatchNorm's running statistics are not
    updated meanwhile). Both give the same product to rounding;
    ``benchmarks/sharpness_cost.py`` times them. ``scaled_dot_product_attention`` runs on
    its math backend meanwhile: its fused kernels have no second derivative.
    """
    validation.choice("method", method, HVP_METHODS)
    out = [torch.zeros_like(p) for p in params]
    for batch in batches:
        hv: Sequence[Tensor | None]
        with _twice_differentiable_attention():
            hv = _hvp_one(model, loss_fn, batch, params, v, method)
        for o, h in zip(out, hv, strict=True):
            if h is not None:
                o.add_(h.detach(), alpha=1 / len(batches))
    return out


def _twice_differentiable_attention() -> contextlib.AbstractContextManager[None]:
    """``scaled_dot_product_attention`` on its math backend: the fused kernels (flash, memory-efficient) have
    no second derivative, so a transformer's Hessian-vector product needs the composite form."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _hvp_one(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: list[Tensor], v: list[Tensor], method: str
) -> Sequence[Tensor | None]:
    """One batch's ``H v`` (see :func:`hvp`)."""
    if method == "forward":
        try:
            return _hvp_forward(model, loss_fn, batch, params, v)
        except RuntimeError as e:
            raise RuntimeError(f"the loss is not twice differentiable in the parameters: {e}") from e
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, u) for g, u in zip(grads, v, strict=True) if g is not None and g.requires_grad]
        if not pairs:
            raise RuntimeError(
                "the loss is not twice differentiable in the parameters: its gradient does not depend on "
                "them (a detached or non-differentiable operation in the model or loss_fn)"
            )
        try:
            return torch.autograd.grad(
                [g for g, _ in pairs], params, grad_outputs=[u for _, u in pairs], allow_unused=True
            )
        except RuntimeError as e:
            raise RuntimeError(f"the loss is not twice differentiable in the parameters: {e}") from e


def _tick(progress: Progress | None) -> None:
    if progress is not None:
        progress(1)


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _gaussian(params: list[Tensor], gen: torch.Generator) -> list[Tensor]:
    """A standard normal tensor shaped as each of ``params`` (drawn on the CPU from ``gen``, so that a seed gives
    the same vectors on every device)."""
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]


def _flatten(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _generator(seed: int | None) -> torch.Generator:
    """The CPU generator of the probe or start vectors (``seed=None``: ``torch.initial_seed()``)."""
    validation.seed_or_none("seed", seed)
    return torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)


def _checked(batches: Sequence[Any], model: nn.Module) -> list[Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch: the measure is over a fixed set of batches")
    return batches


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    bn: str = "train",
    autocast: torch.dtype | None = None,
    seed: int | None = 0,
    hvp_method: str = "reverse",
    progress: Progress | None = None,
) -> Eigenvalues:
    """The ``k`` largest (in magnitude) eigenvalues of the Hessian of the training loss, by power iteration.

    Each eigenvalue is iterated from a seeded Gaussian start, orthogonalised against the
    eigenvectors already found, until its Rayleigh quotient changes by less than ``tol``
    relative to its magnitude, or for ``max_iter`` iterations (``converged`` says which).
    Near a minimum the largest eigenvalues are positive and these are the top ones.

    Args:
        model: the model; unchanged afterwards (see :func:`preserved`).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batches: the fixed batches the loss averages (each counts equally).
        k: how many eigenvalues (>= 1).
        tol: relative tolerance (> 0).
        max_iter: the most power iterations per eigenvalue (>= 1).
        bn: ``"train"`` (batch statistics) or ``"eval"`` (running statistics).
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: the forward passes under
            ``torch.autocast`` in that precision (see :func:`preserved`).
        seed: seed of the start vectors (``None``: ``torch.initial_seed()``).
        hvp_method: ``"reverse"`` (double backward) or ``"forward"`` (forward over reverse); see :func:`hvp`.
        progress: called with 1 after each Hessian-vector product (for a progress bar).

    Example::

        top_eigenvalues(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], k=3).values
    """
    batches = _checked(batches, model)
    k = validation.positive_int("k", k)
    tol = _positive("tol", tol)
    max_iter = validation.positive_int("max_iter", max_iter)
    validation.choice("hvp_method", hvp_method, HVP_METHODS)
    gen = _generator(seed)
    values: list[float] = []
    iterations: list[int] = []
    converged: list[bool] = []
    vectors: list[list[Tensor]] = []
    hvps = 0
    with preserved(model, bn, autocast) as params:
        if k > sum(p.numel() for p in params):
            raise ValueError(f"k must be at most the number of parameters ({sum(p.numel() for p in params)}), got {k}")
        for _ in range(k):
            v = _gaussian(params, gen)
            value, done, it = math.nan, False, 0
            for it in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
                for u in vectors:  # deflation: stay orthogonal to the eigenvectors found
                    c = _dot(v, u)
                    v = [a - c * b for a, b in zip(v, u, strict=True)]
                norm = math.sqrt(_dot(v, v))
                if norm == 0:
                    raise ValueError("the Hessian vanishes on the complement of the eigenvectors found: lower k")
                v = [a / norm for a in v]
                hv = hvp(model, loss_fn, batches, params, v, method=hvp_method)
                hvps += 1
                _tick(progress)
                new = _dot(hv, v)
                if not math.isfinite(new):
                    raise FloatingPointError(f"a non-finite Hessian-vector product (v^T H v = {new})")
                done = not math.isnan(value) and abs(new - value) <= tol * max(abs(value), 1e-12)
                value, v = new, hv
                if done:
                    break
            norm = math.sqrt(_dot(v, v))
            vectors.append([a / norm for a in v] if norm > 0 else v)
            values.append(value)
            iterations.append(it)
            converged.append(done)
    return Eigenvalues(values, iterations, converged, hvps)


#: Allowed values of ``estimator`` in :func:`hessian_trace`.
TRACE_ESTIMATORS = ("hutchinson", "hutch++")


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    probes: int = 100,
    estimator: str = "hutchinson",
    bn: str = "train",
    autocast: torch.dtype | None = None,
    seed: int | None = 0,
    hvp_method: str = "reverse",
    progress: Progress | None = None,
) -> Estimate:
    """An estimate of the trace of the Hessian of the training loss from ``probes`` HVPs, with its standard error.

    ``estimator="hutchinson"``: ``tr H = E[z^T H z]`` over Rademacher vectors ``z``
    (entries +-1, seeded); the standard error is the sample standard deviation over
    ``sqrt(probes)``. ``"hutch++"`` (Meyer, Musco, Musco and Woodruff, SOSA 2021,
    arXiv:2010.09649): a third of the HVPs find an orthonormal basis ``Q`` of ``H S``
    (``S`` Rademacher), a third give ``tr(Q^T H Q)`` exactly, and a third run Hutchinson
    on the rest, ``(I - QQ^T) H (I - QQ^T)``; it pays where a few large eigenvalues carry
    the trace's variance, and holds ``probes / 3`` parameter-sized vectors. Its standard
    error is that of the Hutchinson third, given the basis (the basis's own randomness
    is not in it).

    Args:
        model, loss_fn, batches, bn, autocast, seed, hvp_method, progress: as :func:`top_eigenvalues`.
        probes: HVPs in all (>= 2; for ``"hutch++"`` a multiple of 3, >= 6).
        estimator: ``"hutchinson"`` or ``"hutch++"``.

    Example::

        est = hessian_trace(model, loss_fn, batches, probes=60, estimator="hutch++")
        est.value, est.stderr
    """
    batches = _checked(batches, model)
    probes = validation.positive_int("probes", probes)
    estimator = validation.choice("estimator", estimator, TRACE_ESTIMATORS)
    if probes < 2:
        raise ValueError(f"probes must be at least 2 (the standard error needs two samples), got {probes}")
    if estimator == "hutch++" and (probes % 3 or probes < 6):
        raise ValueError(f"probes must be a multiple of 3 and at least 6 for estimator='hutch++', got {probes}")
    validation.choice("hvp_method", hvp_method, HVP_METHODS)
    gen = _generator(seed)
    with preserved(model, bn, autocast) as params:

        def rademacher() -> list[Tensor]:
            return [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in params]

        def h(v: list[Tensor]) -> list[Tensor]:
            out = hvp(model, loss_fn, batches, params, v, method=hvp_method)
            _tick(progress)
            return out

        if estimator == "hutchinson":
            samples = [_dot(z, h(z)) for z in (rademacher() for _ in range(probes))]
            exact = 0.0
        else:
            k = probes // 3
            flat = torch.stack([_flatten(h(rademacher())) for _ in range(k)], dim=1)
            q = torch.linalg.qr(flat.double()).Q.to(flat.dtype)  # an orthonormal basis of H S
            columns = [_unflatten(q[:, i], params) for i in range(k)]
            exact = sum(_dot(c, h(c)) for c in columns)

            def deflate(v: list[Tensor]) -> list[Tensor]:  # (I - QQ^T) v
                flat_v = _flatten(v)
                return _unflatten(flat_v - q @ (q.T @ flat_v), params)

            samples = []
            for _ in range(k):
                g = deflate(rademacher())
                samples.append(_dot(g, deflate(h(g))))
    values = torch.tensor(samples, dtype=torch.float64)
    return Estimate(exact + float(values.mean()), float(values.std() / math.sqrt(len(samples))), len(samples), probes)


def _unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``flat`` cut into tensors shaped as ``like``."""
    return [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in like]), like, strict=True)]


#: Allowed values of ``norm`` in :func:`m_sharpness`: the ball the perturbation stays in.
NORMS = ("l2", "linf")


@dataclass(frozen=True)
class Sharpness:
    """The result of :func:`m_sharpness` and :func:`average_sharpness`: the mean loss increase over the batches."""

    value: float  # mean over batches of (perturbed loss - loss)
    stderr: float | None  # standard error of ``value`` (see each measure); None where it cannot be estimated
    per_batch: list[float]  # each batch's loss increase
    loss: float  # mean unperturbed loss
    passes: int  # forward passes over a batch (forward-backward ones for the worst case)


@dataclass(frozen=True)
class Landscape:
    """The loss on a 1-D or 2-D grid: ``loss[i]`` at ``alphas[i]``, or ``loss[j][i]`` at ``(alphas[i], betas[j])``."""

    alphas: list[float]
    betas: list[float] | None
    loss: list[float] | list[list[float]]


def _loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> float:
    with torch.no_grad():
        return _finite(float(loss_fn(model, batch)))


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss is not finite ({value}) at the perturbed weights: lower the radius")
    return value


def _positive(name: str, value: object) -> float:
    number = validation.finite(name, value, "a finite real number > 0")
    if number <= 0:
        raise ValueError(f"{name} must be a finite real number > 0, got {value!r}")
    return number


def _move(params: list[Tensor], origin: list[Tensor], scale: list[Tensor] | None, u: list[Tensor]) -> None:
    """Set ``params`` to ``origin + scale * u`` (``scale=None``: 1)."""
    with torch.no_grad():
        for i, (p, w, x) in enumerate(zip(params, origin, u, strict=True)):
            p.copy_(w + (x if scale is None else scale[i] * x))


def _std_error(values: list[float]) -> float | None:
    return float(torch.tensor(values, dtype=torch.float64).std() / math.sqrt(len(values))) if len(values) > 1 else None


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    rho: float,
    norm: str = "l2",
    adaptive: bool = True,
    steps: int = 20,
    random_start: bool = True,
    bn: str = "train",
    autocast: torch.dtype | None = None,
    seed: int | None = 0,
    progress: Progress | None = None,
) -> Sharpness:
    """Worst-case (adaptive) m-sharpness: the largest loss increase within a ball of radius ``rho``, per batch.

    For each batch (its size is the m of m-sharpness, Foret et al., ICLR 2021) the
    perturbation ``delta = c * u`` maximises ``loss(w + delta) - loss(w)`` over
    ``||u|| <= rho`` in the L2 or L-infinity norm, with ``c = |w|`` if ``adaptive`` (the
    reparametrisation-invariant form of Kwon et al., ICML 2021, which Andriushchenko et
    al., ICML 2023, arXiv:2302.07011, find the more telling) and ``c = 1`` otherwise. The
    maximiser is sought by projected steepest ascent in ``u``: from ``u = 0`` and, with
    ``random_start``, a seeded point at half the radius, each step moves the best point
    so far by ``alpha`` along the normalised (L2) or sign (L-infinity) gradient and
    projects back onto the ball; a step that does not raise the loss halves ``alpha``
    (which starts at ``rho``). The result is the best loss found, a lower bound of the
    maximum and never below 0. ``steps=1, random_start=False`` is SAM's (``adaptive``:
    ASAM's) one-step estimate. Their code (tml-epfl/sharpness-vs-generalization) runs
    Auto-PGD with momentum and, for adaptive L2, projects onto the ellipsoid in ``delta``;
    this one projects in ``u``, which bounds the same set.

    ``stderr`` is the standard error over the batches (None for one batch).

    Args:
        model, loss_fn, batches, bn, autocast, seed: as :func:`top_eigenvalues` (``seed``: the random start).
        rho: the radius (> 0); relative to ``|w|`` if ``adaptive``.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: scale the ball by ``|w|`` element-wise.
        steps: ascent steps per batch (>= 1); each is one forward-backward pass.
        random_start: begin also from a random point (needed where the gradient vanishes).
        progress: called with 1 after each ascent step.

    Example::

        s = m_sharpness(model, loss_fn, batches_of_128, rho=0.05, norm="l2", adaptive=True)
        s.value, s.stderr
    """
    batches = _checked(batches, model)
    rho = _positive("rho", rho)
    norm = validation.choice("norm", norm, NORMS)
    adaptive = validation.boolean("adaptive", adaptive)
    steps = validation.positive_int("steps", steps)
    random_start = validation.boolean("random_start", random_start)
    gen = _generator(seed)
    per_batch, base_losses, passes = [], [], 0
    with preserved(model, bn, autocast) as params:
        origin = [p.detach().clone() for p in params]
        scale = [w.abs() for w in origin] if adaptive else None

        def at(batch: Any, u: list[Tensor]) -> tuple[float, list[Tensor]]:
            _move(params, origin, scale, u)
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, grads, strict=True)]
            if scale is not None:  # the gradient in u, where delta = |w| * u
                g = [c * x for c, x in zip(scale, g, strict=True)]
            return _finite(float(loss.detach())), g

        def project(u: list[Tensor]) -> list[Tensor]:
            if norm == "linf":
                return [x.clamp(-rho, rho) for x in u]
            length = math.sqrt(_dot(u, u))
            return u if length <= rho else [x * (rho / length) for x in u]

        for batch in batches:
            best_u = [torch.zeros_like(p) for p in params]
            base, best_g = at(batch, best_u)
            best, passes = base, passes + 1
            if random_start:
                if norm == "l2":
                    z = _gaussian(params, gen)
                    length = math.sqrt(_dot(z, z))
                    u = [x * (rho / 2 / length) for x in z]
                else:
                    u = [((torch.rand(p.shape, generator=gen, dtype=p.dtype) - 0.5) * rho).to(p.device) for p in params]
                loss, g = at(batch, u)
                passes += 1
                if loss > best:
                    best, best_u, best_g = loss, u, g
            alpha = rho
            for _ in range(steps):
                if norm == "linf":
                    d = [x.sign() for x in best_g]
                else:
                    length = math.sqrt(_dot(best_g, best_g))
                    if length == 0:
                        break  # a stationary point of the loss in the ball: nowhere to ascend
                    d = [x / length for x in best_g]
                u = project([a + alpha * b for a, b in zip(best_u, d, strict=True)])
                loss, g = at(batch, u)
                passes += 1
                _tick(progress)
                if loss > best:
                    best, best_u, best_g = loss, u, g
                else:
                    alpha /= 2
            per_batch.append(best - base)
            base_losses.append(base)
    return Sharpness(
        sum(per_batch) / len(per_batch), _std_error(per_batch), per_batch, sum(base_losses) / len(base_losses), passes
    )


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    sigma: float,
    adaptive: bool = True,
    samples: int = 10,
    bn: str = "train",
    autocast: torch.dtype | None = None,
    seed: int | None = 0,
    progress: Progress | None = None,
) -> Sharpness:
    """Average-case sharpness: the mean loss increase under Gaussian weight noise ``delta = sigma * c * z``.

    ``z`` is standard normal (seeded) and ``c = |w|`` if ``adaptive``, else 1, as in the
    average-case measure of Andriushchenko et al., ICML 2023, arXiv:2302.07011. Each
    batch averages ``samples`` draws; ``stderr`` is the Monte Carlo standard error of
    ``value`` over the draws (the batches are fixed).

    Args:
        model, loss_fn, batches, bn, autocast, seed: as :func:`top_eigenvalues` (``seed``: the noise).
        sigma: the noise scale (> 0); relative to ``|w|`` if ``adaptive``.
        adaptive: scale the noise by ``|w|`` element-wise.
        samples: noise draws per batch (>= 2, for a standard error).
        progress: called with 1 after each draw.

    Example::

        average_sharpness(model, loss_fn, batches, sigma=0.01, samples=20).value
    """
    batches = _checked(batches, model)
    sigma = _positive("sigma", sigma)
    adaptive = validation.boolean("adaptive", adaptive)
    samples = validation.positive_int("samples", samples)
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (the standard error needs two draws), got {samples}")
    gen = _generator(seed)
    per_batch, base_losses, variances = [], [], []
    with preserved(model, bn, autocast) as params:
        origin = [p.detach().clone() for p in params]
        scale = [w.abs() for w in origin] if adaptive else None
        for batch in batches:
            base = _loss(model, loss_fn, batch)
            rises = []
            for _ in range(samples):
                z = [x * sigma for x in _gaussian(params, gen)]
                _move(params, origin, scale, z)
                rises.append(_loss(model, loss_fn, batch) - base)
                _tick(progress)
            _move(params, origin, None, [torch.zeros_like(p) for p in params])
            values = torch.tensor(rises, dtype=torch.float64)
            per_batch.append(float(values.mean()))
            variances.append(float(values.var()) / samples)
            base_losses.append(base)
    n = len(batches)
    return Sharpness(
        sum(per_batch) / n, math.sqrt(sum(variances)) / n, per_batch, sum(base_losses) / n, n * (samples + 1)
    )


def filter_normalized_direction(model: nn.Module, *, seed: int | None = 0, include_1d: bool = False) -> list[Tensor]:
    """A random direction in weight space with each filter scaled to the norm of the matching filter of the weights.

    Li et al., NeurIPS 2018, arXiv:1712.09913: a Gaussian direction (seeded) over the
    parameters that require a gradient (in ``model.parameters()`` order), each slice
    ``d[i]`` of a tensor of two or more dimensions (a filter of a convolution, a row of a
    linear layer) rescaled to ``||w[i]||``. One-dimensional tensors (biases, normalisation
    parameters) are zero, as in their default, or with ``include_1d`` rescaled as a whole
    to the norm of the tensor.

    Example::

        d1, d2 = filter_normalized_direction(model, seed=0), filter_normalized_direction(model, seed=1)
        landscape(model, loss_fn, batches, [d1, d2], alphas=torch.linspace(-1, 1, 21).tolist())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include_1d = validation.boolean("include_1d", include_1d)
    gen = _generator(seed)
    direction = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        w = p.detach()
        (d,) = _gaussian([w], gen)
        if w.dim() <= 1:
            d = d * (w.norm() / d.norm()) if include_1d and d.norm() > 0 else torch.zeros_like(w)
        else:
            rows = d.flatten(1)
            ratio = w.flatten(1).norm(dim=1) / rows.norm(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
            d = (rows * ratio[:, None]).view_as(w)
        direction.append(d)
    return direction


def _coords(name: str, values: Sequence[float]) -> list[float]:
    coords = [validation.finite(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if not coords:
        raise ValueError(f"{name} must hold at least one coordinate")
    return coords


def _mean_loss(model: nn.Module, loss_fn: LossFn, batches: list[Any]) -> float:
    return sum(_loss(model, loss_fn, b) for b in batches) / len(batches)


def landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    directions: Sequence[list[Tensor]],
    alphas: Sequence[float],
    betas: Sequence[float] | None = None,
    *,
    bn: str = "train",
    autocast: torch.dtype | None = None,
    progress: Progress | None = None,
) -> Landscape:
    """The mean batch loss at ``w + alpha * d1`` (1-D) or ``w + alpha * d1 + beta * d2`` (2-D) on a grid.

    Args:
        model, loss_fn, batches, bn, autocast: as :func:`top_eigenvalues`.
        directions: one or two directions, each a tensor per parameter that requires a
            gradient (for example from :func:`filter_normalized_direction`).
        alphas: coordinates along the first direction.
        betas: coordinates along the second (2-D only; default: ``alphas``).
        progress: called with 1 after each grid point.

    Example::

        d = filter_normalized_direction(model)
        curve = landscape(model, loss_fn, batches, [d], alphas=[-1, -0.5, 0, 0.5, 1]).loss
    """
    batches = _checked(batches, model)
    directions = list(directions)
    if len(directions) not in (1, 2):
        raise ValueError(f"directions must hold one or two directions, got {len(directions)}")
    a = _coords("alphas", alphas)
    if len(directions) == 1 and betas is not None:
        raise ValueError("betas is for a 2-D landscape: pass two directions, or no betas")
    b = None if len(directions) == 1 else _coords("betas", a if betas is None else betas)
    with preserved(model, bn, autocast) as params:
        for k, d in enumerate(directions):
            shapes = [tuple(t.shape) for t in d]
            if shapes != [tuple(p.shape) for p in params]:
                raise ValueError(
                    f"directions[{k}] must hold one tensor per parameter that requires a gradient, with its shape: "
                    f"{len(params)} tensors expected, got {len(d)} (shapes {shapes[:3]}...)"
                )
        origin = [p.detach().clone() for p in params]

        def point(x: float, y: float) -> float:
            step = [x * u + (0.0 if b is None else y * v) for u, v in zip(directions[0], directions[-1], strict=True)]
            _move(params, origin, None, step)
            value = _mean_loss(model, loss_fn, batches)
            _tick(progress)
            return value

        if b is None:
            return Landscape(a, None, [point(x, 0.0) for x in a])
        return Landscape(a, b, [[point(x, y) for x in a] for y in b])


def interpolation(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    alphas: Sequence[float],
    *,
    bn: str = "train",
    autocast: torch.dtype | None = None,
    progress: Progress | None = None,
) -> Landscape:
    """The mean batch loss along the line ``(1 - alpha) * start + alpha * end`` between two state dicts.

    Every floating-point entry (parameters and buffers such as BatchNorm's running
    statistics, which matter with ``bn="eval"``) is interpolated; integer buffers come
    from ``start``. ``model`` supplies the architecture and is unchanged afterwards
    (Goodfellow et al., ICLR 2015, arXiv:1412.6544, plot SGD's path this way).

    Example::

        line = interpolation(model, loss_fn, batches, sgd_state, sam_state, alphas=[-0.5, 0, 0.5, 1, 1.5])
    """
    batches = _checked(batches, model)
    a = _coords("alphas", alphas)
    keys = set(model.state_dict())
    for name, state in (("start", start), ("end", end)):
        if set(state) != keys:
            missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
            raise ValueError(
                f"{name} must be a state dict of the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    values = []
    with preserved(model, bn, autocast):
        for x in a:
            mixed = {
                k: torch.lerp(start[k], end[k].to(start[k].dtype), x) if start[k].is_floating_point() else start[k]
                for k in start
            }
            model.load_state_dict(mixed)
            values.append(_mean_loss(model, loss_fn, batches))
            _tick(progress)
    return Landscape(a, None, values)
