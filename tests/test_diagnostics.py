"""samopt.diagnostics against the exact Hessian of small models and the closed form of a quadratic."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, image_batch, vector_batch
from torch import nn
from torch.func import functional_call

from samopt.diagnostics import (
    HVP_METHODS,
    average_sharpness,
    filter_normalized_direction,
    hessian_trace,
    hvp,
    interpolation,
    landscape,
    m_sharpness,
    preserved,
    top_eigenvalues,
)


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


@pytest.mark.parametrize("method", ["reverse", "forward"])
@pytest.mark.parametrize("kind, bn", [("mlp", "train"), ("cnn", "train"), ("cnn", "eval")])
def test_top_eigenvalues_and_trace_equal_those_of_the_exact_hessian(kind, bn, method):
    model = smooth_mlp() if kind == "mlp" else bn_cnn()
    batches = batches_of(kind)
    if kind == "cnn":  # running statistics other than the batch's, so that the two modes differ
        with torch.no_grad():
            model(batches[0][0] * 3 + 1)
    eig = torch.linalg.eigvalsh(exact_hessian(model, batches, bn))
    exact = sorted(eig.tolist(), key=abs, reverse=True)  # by magnitude (away from a minimum, some are negative)
    k = 2 if kind == "mlp" else 1
    top = top_eigenvalues(model, loss_fn, batches, k=k, tol=1e-8, max_iter=1000, bn=bn, hvp_method=method)
    assert top.converged == [True] * k and top.hvps == sum(top.iterations)
    assert top.values == pytest.approx(exact[:k], rel=1e-5)
    tr = hessian_trace(model, loss_fn, batches, probes=100, bn=bn, seed=1, hvp_method=method)
    assert abs(tr.value - float(eig.sum())) < 3 * tr.stderr
    assert tr.stderr < 0.5 * abs(float(eig.sum())) and tr.samples == tr.hvps == 100
    pp = hessian_trace(model, loss_fn, batches, probes=30, estimator="hutch++", bn=bn, seed=1, hvp_method=method)
    assert abs(pp.value - float(eig.sum())) < 3 * pp.stderr and (pp.samples, pp.hvps) == (10, 30)


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
    m_sharpness(model, loss_fn, batches, rho=0.1, steps=2)
    m_sharpness(model, loss_fn, batches, rho=0.1, steps=2, norm="linf", bn="eval")
    average_sharpness(model, loss_fn, batches, sigma=0.1, samples=2)
    direction = filter_normalized_direction(model)
    landscape(model, loss_fn, batches, [direction, direction], [-1.0, 1.0], bn="eval")
    other = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    interpolation(model, loss_fn, batches, model.state_dict(), other, [0.5], bn="eval")
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
        (
            lambda m, b: hessian_trace(m, loss_fn, b, probes=7, estimator="hutch++"),
            ValueError,
            "probes must be a multiple of 3 and at least 6 for estimator='hutch\\+\\+', got 7",
        ),
        (
            lambda m, b: hessian_trace(m, loss_fn, b, estimator="hutch"),
            ValueError,
            "estimator must be one of 'hutchinson', 'hutch\\+\\+'",
        ),
        (
            lambda m, b: hessian_trace(m, loss_fn, b, hvp_method="fd"),
            ValueError,
            "hvp_method must be one of 'reverse', 'forward'",
        ),
        (
            lambda m, b: hvp(m, loss_fn, b, list(m.parameters()), [p.detach() for p in m.parameters()], method="fd"),
            ValueError,
            "^method must be one of 'reverse', 'forward'",  # the argument's own name, not hessian_trace's
        ),
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


class ShiftedQuadratic(nn.Module):
    """``0.5 (w - w0)^T A (w - w0) + g^T (w - w0)`` at ``w = w0``: the loss increase of ``delta`` is known."""

    def __init__(self, a: torch.Tensor, w0: torch.Tensor, g: torch.Tensor) -> None:
        super().__init__()
        self.a, self.w0, self.g = a, w0, g
        self.w = nn.Parameter(w0.clone())

    def forward(self, _):
        d = self.w - self.w0
        return 0.5 * d @ self.a @ d + self.g @ d


def quad_loss(model, batch):
    return model(batch)


def symmetric_psd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return q @ q.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def trust_region_maximum(a: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """max of 0.5 d^T A d + g^T d over ||d|| <= rho for A >= 0: d = (lam I - A)^-1 g on the sphere, lam > lam_max."""
    top = float(torch.linalg.eigvalsh(a)[-1])
    eye = torch.eye(len(g), dtype=a.dtype)
    lo, hi = top + 1e-12, top + 1e6
    for _ in range(200):  # ||d(lam)|| falls from infinity to 0 as lam grows: bisect for rho
        lam = (lo + hi) / 2
        d = torch.linalg.solve(lam * eye - a, g)
        lo, hi = (lam, hi) if d.norm() > rho else (lo, lam)
    return float(0.5 * d @ a @ d + g @ d)


W0 = torch.tensor([0.5, -2.0, 1.0, 3.0, -0.25], dtype=torch.float64)
DIAG = torch.tensor([0.5, 5.0, 1.0, 3.0, 2.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "a, g, norm, adaptive, exact",
    [  # at a minimum: the top eigenvalue (L2), the sum of the curvatures at the corner (L-infinity)
        (
            symmetric_psd(5, 0),
            torch.zeros(5),
            "l2",
            False,
            lambda a, r: 0.5 * r**2 * float(torch.linalg.eigvalsh(a)[-1]),
        ),
        (torch.diag(DIAG), torch.zeros(5), "l2", True, lambda a, r: 0.5 * r**2 * float((DIAG * W0**2).max())),
        (torch.diag(DIAG), torch.zeros(5), "linf", False, lambda a, r: 0.5 * r**2 * float(DIAG.sum())),
        (torch.diag(DIAG), torch.zeros(5), "linf", True, lambda a, r: 0.5 * r**2 * float((DIAG * W0**2).sum())),
        # away from a minimum: the trust-region maximum
        (symmetric_psd(5, 1), torch.tensor([0.3, -0.1, 0.2, 0.0, 0.4]), "l2", False, None),
    ],
)
def test_worst_case_sharpness_of_a_quadratic_equals_its_closed_form(a, g, norm, adaptive, exact):
    rho = 0.5
    g = g.double()
    model = ShiftedQuadratic(a, W0, g)
    s = m_sharpness(model, quad_loss, [None], rho=rho, norm=norm, adaptive=adaptive, steps=200)
    expected = trust_region_maximum(a, g, rho) if exact is None else exact(a, rho)
    assert s.value == pytest.approx(expected, rel=1e-6)
    assert s.per_batch == [s.value] and s.loss == 0.0 and s.stderr is None and s.passes == 1 + 1 + 200


def test_one_step_without_a_random_start_is_the_loss_at_sams_and_asams_perturbation():
    model, batches = smooth_mlp(), batches_of("mlp")[:1]
    params = list(model.parameters())
    loss = loss_fn(model, batches[0])
    grads = torch.autograd.grad(loss, params)
    loss = loss.detach()
    rho = 0.05
    for adaptive in (False, True):
        c = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ci * g) ** 2).sum() for ci, g in zip(c, grads, strict=True)))
        with torch.no_grad():
            moved = [p + rho * ci**2 * g / norm for p, ci, g in zip(params, c, grads, strict=True)]
            names = [n for n, _ in model.named_parameters()]
            perturbed = F.cross_entropy(
                functional_call(model, dict(zip(names, moved, strict=True)), (batches[0][0],)), batches[0][1]
            )
        s = m_sharpness(model, loss_fn, batches, rho=rho, adaptive=adaptive, steps=1, random_start=False)
        assert s.value == pytest.approx(float(perturbed - loss), rel=1e-9) and s.passes == 2
        assert s.loss == pytest.approx(float(loss), rel=1e-12)


def test_worst_case_sharpness_is_at_least_the_one_step_estimate_and_grows_with_the_radius():
    model, batches = bn_cnn(), batches_of("cnn")
    one = m_sharpness(model, loss_fn, batches, rho=0.05, steps=1, random_start=False)
    many = m_sharpness(model, loss_fn, batches, rho=0.05, steps=10)
    wider = m_sharpness(model, loss_fn, batches, rho=0.1, steps=10)
    assert 0 < one.value <= many.value < wider.value
    assert len(many.per_batch) == 2 and many.stderr is not None and many.passes == 2 * (1 + 1 + 10)


def test_average_sharpness_of_a_quadratic_is_half_sigma_squared_times_the_scaled_trace():
    a = symmetric_psd(5, 2)
    model = ShiftedQuadratic(a, W0, torch.zeros(5, dtype=torch.float64))
    sigma = 0.1
    for adaptive, c in ((False, torch.ones(5, dtype=torch.float64)), (True, W0.abs())):
        s = average_sharpness(model, quad_loss, [None, None], sigma=sigma, adaptive=adaptive, samples=400, seed=3)
        expected = 0.5 * sigma**2 * float((torch.diagonal(a) * c**2).sum())
        assert abs(s.value - expected) < 3 * s.stderr and s.stderr < 0.1 * expected
        assert s.passes == 2 * 401 and len(s.per_batch) == 2


def test_the_landscape_at_the_origin_is_the_loss_and_a_quadratic_gives_its_parabola():
    model = ShiftedQuadratic(symmetric_psd(5, 3), W0, torch.zeros(5, dtype=torch.float64))
    d1 = [torch.tensor([1.0, 0.0, 2.0, 0.0, -1.0], dtype=torch.float64)]
    d2 = [torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)]
    line = landscape(model, quad_loss, [None], [d1], [-1.0, 0.0, 0.5])
    curvature = float(d1[0] @ model.a @ d1[0])
    assert line.loss == pytest.approx([0.5 * curvature, 0.0, 0.125 * curvature], rel=1e-12) and line.betas is None
    plane = landscape(model, quad_loss, [None], [d1, d2], [0.0, 1.0], [2.0])
    d = d1[0] + 2 * d2[0]
    assert plane.betas == [2.0] and plane.loss[0] == pytest.approx(
        [float(0.5 * (2 * d2[0]) @ model.a @ (2 * d2[0])), float(0.5 * d @ model.a @ d)], rel=1e-12
    )
    cnn, batches = bn_cnn(), batches_of("cnn")
    with torch.no_grad():
        cnn(batches[0][0] * 3 + 1)
    for bn in ("train", "eval"):
        cnn.train(bn == "train")
        cnn[4].eval()
        with torch.no_grad():
            loss = sum(float(loss_fn(cnn, b)) for b in batches) / 2
        flat = landscape(cnn, loss_fn, batches, [filter_normalized_direction(cnn)], [0.0], bn=bn)
        assert flat.loss == [pytest.approx(loss, rel=1e-12)]


def test_filter_normalisation_gives_each_filter_the_norm_of_the_weights_filter():
    model = bn_cnn()
    params = list(model.parameters())
    direction = filter_normalized_direction(model, seed=1)
    assert [d.shape for d in direction] == [p.shape for p in params]
    for p, d in zip(params, direction, strict=True):
        if p.dim() > 1:
            assert torch.allclose(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-12)
            assert not torch.allclose(d, p)  # a random direction, not the weights
        else:
            assert torch.equal(d, torch.zeros_like(p))
    whole = filter_normalized_direction(model, seed=1, include_1d=True)
    for p, d in zip(params, whole, strict=True):
        if p.dim() == 1:
            assert float(d.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
    assert not torch.equal(direction[0], filter_normalized_direction(model, seed=2)[0])
    model[0].requires_grad_(False)
    assert len(filter_normalized_direction(model)) == len(params) - 2


def test_the_line_between_two_state_dicts_ends_at_each_models_loss():
    batches = batches_of("cnn")
    start, end = bn_cnn(), bn_cnn()
    torch.manual_seed(9)
    with torch.no_grad():
        for p in end.parameters():
            p.add_(0.1 * torch.randn_like(p))
        end(batches[1][0] * 2 - 1)  # running statistics of its own
    for bn in ("train", "eval"):
        expected = []
        for m in (start, end):
            m.train(bn == "train")
            m[4].eval()
            with torch.no_grad():
                expected.append(sum(float(loss_fn(m, b)) for b in batches) / 2)
        line = interpolation(start, loss_fn, batches, start.state_dict(), end.state_dict(), [0.0, 0.5, 1.0], bn=bn)
        assert line.loss[0] == pytest.approx(expected[0], rel=1e-12)
        assert line.loss[2] == pytest.approx(expected[1], rel=1e-12)
        assert line.loss[1] != pytest.approx(expected[0]) and line.alphas == [0.0, 0.5, 1.0]


def test_a_loss_that_is_not_twice_differentiable_is_refused_clearly():
    model, batches = smooth_mlp(), batches_of("mlp")

    def once(m, b):  # distances to class prototypes: cdist has no second derivative in PyTorch
        return F.cross_entropy(-torch.cdist(m[1](m[0](b[0])), m[2].weight), b[1])

    for method in HVP_METHODS:
        with pytest.raises(RuntimeError, match="the loss is not twice differentiable in the parameters"):
            top_eigenvalues(model, once, batches, hvp_method=method)
    assert m_sharpness(model, once, batches, rho=0.01, steps=1).value > 0  # first order only: fine


def test_progress_is_reported_per_unit_of_work():
    model, batches = smooth_mlp(), batches_of("mlp")
    ticks = []
    top = top_eigenvalues(model, loss_fn, batches, max_iter=3, progress=ticks.append)
    hessian_trace(model, loss_fn, batches, probes=2, progress=ticks.append)
    m_sharpness(model, loss_fn, batches, rho=0.1, steps=3, progress=ticks.append)
    average_sharpness(model, loss_fn, batches, sigma=0.1, samples=2, progress=ticks.append)
    landscape(
        model, loss_fn, batches, [filter_normalized_direction(model)] * 2, [0.0, 1.0], [1.0], progress=ticks.append
    )
    assert ticks == [1] * (top.hvps + 2 + 2 * 3 + 2 * 2 + 2)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, b: m_sharpness(m, loss_fn, b, rho=0), ValueError, "rho must be a finite real number > 0"),
        (lambda m, b: m_sharpness(m, loss_fn, b, rho=float("nan")), ValueError, "rho must be a finite real number"),
        (lambda m, b: m_sharpness(m, loss_fn, b, rho=0.1, norm="l1"), ValueError, "norm must be one of 'l2', 'linf'"),
        (lambda m, b: m_sharpness(m, loss_fn, b, rho=0.1, steps=0), ValueError, "steps must be an integer >= 1"),
        (
            lambda m, b: m_sharpness(
                ShiftedQuadratic(DIAG.diag(), W0, W0), quad_loss, [None], rho=1e200, adaptive=False
            ),
            FloatingPointError,
            "lower the radius",
        ),
        (lambda m, b: average_sharpness(m, loss_fn, b, sigma=-1), ValueError, "sigma must be a finite real number > 0"),
        (lambda m, b: average_sharpness(m, loss_fn, b, sigma=0.1, samples=1), ValueError, "samples must be at least 2"),
        (lambda m, b: landscape(m, loss_fn, b, [], [0.0]), ValueError, "directions must hold one or two"),
        (lambda m, b: landscape(m, loss_fn, b, [[torch.zeros(2)]], [0.0]), ValueError, r"directions\[0\] must hold"),
        (
            lambda m, b: landscape(m, loss_fn, b, [filter_normalized_direction(m)], [0.0], [1.0]),
            ValueError,
            "betas is for a 2-D landscape",
        ),
        (
            lambda m, b: landscape(m, loss_fn, b, [filter_normalized_direction(m)], []),
            ValueError,
            "alphas must hold at least one",
        ),
        (
            lambda m, b: interpolation(m, loss_fn, b, {}, m.state_dict(), [0.0]),
            ValueError,
            r"start must be a state dict of the model: missing \['0.bias', '0.weight'",
        ),
    ],
)
def test_bad_sharpness_and_landscape_arguments_are_refused_naming_them(call, error, message):
    with pytest.raises(error, match=message):
        call(smooth_mlp(), batches_of("mlp"))


def test_the_two_hessian_vector_products_agree_and_leave_batchnorm_as_it_was():
    model, batches = bn_cnn(), batches_of("cnn")
    for bn in ("train", "eval"):
        with preserved(model, bn) as params:
            v = [torch.randn_like(p) for p in params]
            running = [b.clone() for b in model.buffers()]
            forward = hvp(model, loss_fn, batches, params, v, method="forward")
            assert_equal_tensors(list(model.buffers()), running)  # no running statistics updated
            assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
            reverse = hvp(model, loss_fn, batches, params, v, method="reverse")
        for f, r in zip(forward, reverse, strict=True):
            assert torch.allclose(f, r, rtol=1e-10, atol=1e-13)


def test_autocast_runs_the_forward_passes_in_bfloat16_and_is_put_back():
    model = bn_cnn().float()
    batches = [(x.float(), y) for x, y in batches_of("cnn")]
    full = top_eigenvalues(model, loss_fn, batches, tol=1e-6, max_iter=500)
    half = top_eigenvalues(model, loss_fn, batches, tol=1e-6, max_iter=500, autocast=torch.bfloat16)
    assert half.values[0] != full.values[0] and half.values[0] == pytest.approx(full.values[0], rel=0.05)
    s = m_sharpness(model, loss_fn, batches, rho=0.05, steps=3, autocast=torch.bfloat16)
    assert s.value >= 0 and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match=r"autocast must be None, torch.bfloat16 or torch.float16, got torch.int8"):
        hessian_trace(model, loss_fn, batches, autocast=torch.int8)


def test_hutch_plus_plus_is_exact_on_a_hessian_of_low_rank_where_hutchinson_is_not():
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    a = u @ u.T  # rank 2: two thirds of 6 probes span its range
    model = ShiftedQuadratic(a, torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    exact = float(torch.trace(a))
    pp = hessian_trace(model, quad_loss, [None], probes=6, estimator="hutch++")
    assert pp.value == pytest.approx(exact, rel=1e-10) and pp.stderr < 1e-10 * exact
    plain = hessian_trace(model, quad_loss, [None], probes=6)
    assert plain.stderr > 0.01 * exact and plain.value != pytest.approx(exact, rel=1e-6)
