"""samopt.diagnostics against the exact Hessian of small models and the closed form of a quadratic."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, image_batch, vector_batch
from torch import nn
from torch.func import functional_call

from samopt.diagnostics import hessian_trace, top_eigenvalues


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def smooth_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def bn_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(2 * 4 * 4, 3)
    ).double()


def exact_hessian(model, batches, bn: str) -> torch.Tensor:
    """The Hessian of the mean batch loss over every parameter, from torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    model.train(bn == "train")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()

    def loss(theta):
        parts = theta.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        total = sum(loss_fn(lambda x: functional_call(model, {**params, **buffers}, (x,)), b) for b in batches)
        return total / len(batches)

    return torch.autograd.functional.hessian(loss, flat)


def batches_of(kind: str):
    if kind == "mlp":
        return [tuple(t.double() if t.is_floating_point() else t for t in vector_batch(seed=s)) for s in (0, 1)]
    return [(image_batch(seed=s)[0].double(), image_batch(seed=s)[1]) for s in (0, 1)]


@pytest.mark.parametrize("kind, bn", [("mlp", "train"), ("cnn", "train"), ("cnn", "eval")])
def test_top_eigenvalues_and_trace_equal_those_of_the_exact_hessian(kind, bn):
    model = smooth_mlp() if kind == "mlp" else bn_cnn()
    batches = batches_of(kind)
    if kind == "cnn":  # running statistics other than the batch's, so that the two modes differ
        with torch.no_grad():
            model(batches[0][0] * 3 + 1)
    eig = torch.linalg.eigvalsh(exact_hessian(model, batches, bn))
    exact = sorted(eig.tolist(), key=abs, reverse=True)  # by magnitude (away from a minimum, some are negative)
    k = 2 if kind == "mlp" else 1
    top = top_eigenvalues(model, loss_fn, batches, k=k, tol=1e-8, max_iter=1000, bn=bn)
    assert top.converged == [True] * k and top.hvps == sum(top.iterations)
    assert top.values == pytest.approx(exact[:k], rel=1e-5)
    tr = hessian_trace(model, loss_fn, batches, probes=100, bn=bn, seed=1)
    assert abs(tr.value - float(eig.sum())) < 3 * tr.stderr
    assert tr.stderr < 0.5 * abs(float(eig.sum())) and tr.samples == tr.hvps == 100


def test_the_two_batchnorm_modes_measure_different_functions():
    model = bn_cnn()
    batches = batches_of("cnn")
    with torch.no_grad():
        model(batches[0][0] * 3 + 1)
    train = top_eigenvalues(model, loss_fn, batches, bn="train").values[0]
    running = top_eigenvalues(model, loss_fn, batches, bn="eval").values[0]
    assert abs(train - running) > 1e-3 * abs(train)


class Quadratic(nn.Module):
    """``0.5 w^T A w`` with ``A = diag(a)``: the Hessian is ``A``."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.ones(len(a), dtype=a.dtype))

    def forward(self, _):
        return 0.5 * (self.a * self.w**2).sum()


def test_a_quadratic_gives_its_eigenvalues_and_exactly_its_trace():
    a = torch.tensor([0.5, 5.0, 1.0, 3.0], dtype=torch.float64)
    model = Quadratic(a)
    top = top_eigenvalues(model, lambda m, b: m(b), [None], k=3, tol=1e-12, max_iter=1000)
    assert top.values == pytest.approx([5.0, 3.0, 1.0], rel=1e-9)
    tr = hessian_trace(model, lambda m, b: m(b), [None], probes=5)
    assert (tr.value, tr.stderr) == (9.5, 0.0)  # z_i^2 = 1 for Rademacher probes: exact


def test_a_measure_leaves_the_model_its_gradients_flags_modes_and_the_rng_as_they_were():
    model = bn_cnn()
    batches = batches_of("cnn")
    model(batches[0][0]).sum().backward()  # gradients and running statistics to keep
    model[-1].bias.requires_grad_(False)
    model.eval()
    model[1].train()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    top_eigenvalues(model, loss_fn, batches, k=2, max_iter=5)
    hessian_trace(model, loss_fn, batches, probes=3)
    assert_equal_tensors([p.detach() for p in model.parameters()], params)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert_equal_tensors(list(model.buffers()), buffers)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == [True] * 5 + [False]
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_hessian_is_over_the_parameters_that_require_a_gradient():
    model = smooth_mlp()
    batches = batches_of("mlp")
    model[0].requires_grad_(False)
    full = exact_hessian(model, batches, "train")
    last = full[-21:, -21:]  # the second layer's weight and bias
    exact = sorted(torch.linalg.eigvalsh(last).tolist(), key=abs, reverse=True)
    assert top_eigenvalues(model, loss_fn, batches, tol=1e-8, max_iter=1000).values[0] == pytest.approx(
        exact[0], rel=1e-5
    )


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, b: top_eigenvalues(m, loss_fn, b, k=0), ValueError, "k must be an integer >= 1"),
        (lambda m, b: top_eigenvalues(m, loss_fn, b, k=100), ValueError, "k must be at most the number of parameters"),
        (lambda m, b: top_eigenvalues(m, loss_fn, b, tol=0), ValueError, "tol must be a finite real number > 0"),
        (lambda m, b: top_eigenvalues(m, loss_fn, b, max_iter=0), ValueError, "max_iter must be an integer >= 1"),
        (lambda m, b: top_eigenvalues(m, loss_fn, b, bn="running"), ValueError, "bn must be one of 'train', 'eval'"),
        (lambda m, b: top_eigenvalues(m, loss_fn, []), ValueError, "batches must hold at least one batch"),
        (lambda m, b: hessian_trace(m, loss_fn, b, probes=1), ValueError, "probes must be at least 2"),
        (lambda m, b: hessian_trace("model", loss_fn, b), TypeError, "model must be a torch.nn.Module"),
        (lambda m, b: hessian_trace(m, loss_fn, b, seed=1.5), TypeError, "seed must be None or an int"),
    ],
)
def test_bad_arguments_are_refused_naming_them(call, error, message):
    with pytest.raises(error, match=message):
        call(smooth_mlp(), batches_of("mlp"))


def test_seeds_make_the_estimates_reproducible():
    model, batches = smooth_mlp(), batches_of("mlp")
    a = hessian_trace(model, loss_fn, batches, probes=4, seed=3)
    b = hessian_trace(model, loss_fn, batches, probes=4, seed=3)
    c = hessian_trace(model, loss_fn, batches, probes=4, seed=4)
    assert a == b and a.value != c.value
