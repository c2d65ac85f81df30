"""Sharpness diagnostics: the curvature of a model's training loss, measured without changing the model.

- :func:`top_eigenvalues`: the largest Hessian eigenvalues by power iteration with
  deflation over Hessian-vector products (as PyHessian, Yao et al., "PyHessian: Neural
  Networks Through the Lens of the Hessian", IEEE BigData 2020, arXiv:1912.07145, does),
  with a relative tolerance and the iterations reported;
- :func:`hessian_trace`: Hutchinson's estimate ``E[z^T H z]`` over Rademacher probes,
  with its standard error.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from samopt import validation

__all__ = ["BN_MODES", "Eigenvalues", "Estimate", "hessian_trace", "hvp", "preserved", "top_eigenvalues"]

#: Allowed values of ``bn``: BatchNorm with the batch's statistics (as in training) or its running ones.
BN_MODES = ("train", "eval")
#: ``loss_fn(model, batch) -> scalar``: the training loss of one batch.
LossFn = Callable[[nn.Module, Any], Tensor]
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
    """A Monte Carlo estimate: its mean, its standard error and the samples it averages."""

    value: float
    stderr: float
    samples: int
    hvps: int


@contextlib.contextmanager
def preserved(model: nn.Module, bn: str = "train") -> Iterator[list[Tensor]]:
    """Run a measurement on ``model`` in BatchNorm mode ``bn`` with dropout off; everything is put back on leaving.

    Yields the parameters that require a gradient (the ones the Hessian is over). On
    leaving (also after an exception) the weights, buffers (BatchNorm's running
    statistics), ``.grad``, ``requires_grad`` flags, training modes and the CPU and
    CUDA RNG states are as they were.
    """
    validation.choice("bn", bn, BN_MODES)
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


def hvp(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], params: list[Tensor], v: list[Tensor]
) -> list[Tensor]:
    """``H v``, the Hessian of the mean batch loss over ``params`` times ``v`` (double backward, batch by batch)."""
    out = [torch.zeros_like(p) for p in params]
    for batch in batches:
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=v, allow_unused=True)
        for o, h in zip(out, hv, strict=True):
            if h is not None:
                o.add_(h.detach(), alpha=1 / len(batches))
    return out


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


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
    seed: int | None = 0,
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
        seed: seed of the start vectors (``None``: ``torch.initial_seed()``).

    Example::

        top_eigenvalues(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], k=3).values
    """
    batches = _checked(batches, model)
    k = validation.positive_int("k", k)
    tol = validation.finite("tol", tol, "a finite real number > 0")
    if tol <= 0:
        raise ValueError(f"tol must be a finite real number > 0, got {tol!r}")
    max_iter = validation.positive_int("max_iter", max_iter)
    gen = _generator(seed)
    values: list[float] = []
    iterations: list[int] = []
    converged: list[bool] = []
    vectors: list[list[Tensor]] = []
    hvps = 0
    with preserved(model, bn) as params:
        if k > sum(p.numel() for p in params):
            raise ValueError(f"k must be at most the number of parameters ({sum(p.numel() for p in params)}), got {k}")
        for _ in range(k):
            v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
            value, done, it = math.nan, False, 0
            for it in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
                for u in vectors:  # deflation: stay orthogonal to the eigenvectors found
                    c = _dot(v, u)
                    v = [a - c * b for a, b in zip(v, u, strict=True)]
                norm = math.sqrt(_dot(v, v))
                if norm == 0:
                    raise ValueError("the Hessian vanishes on the complement of the eigenvectors found: lower k")
                v = [a / norm for a in v]
                hv = hvp(model, loss_fn, batches, params, v)
                hvps += 1
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


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    probes: int = 100,
    bn: str = "train",
    seed: int | None = 0,
) -> Estimate:
    """Hutchinson's estimate of the trace of the Hessian of the training loss, with its standard error.

    ``tr H = E[z^T H z]`` over Rademacher vectors ``z`` (entries +-1, seeded); the
    standard error is the sample standard deviation over ``sqrt(probes)``.

    Args:
        model, loss_fn, batches, bn, seed: as :func:`top_eigenvalues`.
        probes: the number of probe vectors (>= 2, for a standard error).

    Example::

        est = hessian_trace(model, loss_fn, batches, probes=50)
        est.value, est.stderr
    """
    batches = _checked(batches, model)
    probes = validation.positive_int("probes", probes)
    if probes < 2:
        raise ValueError(f"probes must be at least 2 (the standard error needs two samples), got {probes}")
    gen = _generator(seed)
    samples = []
    with preserved(model, bn) as params:
        for _ in range(probes):
            z = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in params]
            samples.append(_dot(z, hvp(model, loss_fn, batches, params, z)))
    values = torch.tensor(samples, dtype=torch.float64)
    return Estimate(float(values.mean()), float(values.std() / math.sqrt(probes)), probes, probes)
