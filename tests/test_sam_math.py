"""SAM and ASAM updates against references derived by hand in plain tensor math.

The model is linear regression ``f(x) = x W^T + b`` with mean squared error, whose
gradients have a closed form, so no samopt or autograd code is in the reference.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, mlp, vector_batch, weights
from torch import nn

import samopt

D, K, N = 4, 3, 6


def problem():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(N, K, generator=g, dtype=torch.float64)
    W = torch.randn(K, D, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    return x, y, W, b


def grads(W, b, x, y):
    """d/dW and d/db of mean((x W^T + b - y)^2) over all N*K entries, by hand."""
    r = x @ W.T + b - y
    return 2.0 / (N * K) * r.T @ x, 2.0 / (N * K) * r.sum(0)


def perturbation(W, b, gW, gb, *, rho_W, rho_b, adaptive_W, adaptive_b, eta):
    tW = W.abs() + eta if adaptive_W else torch.ones_like(W)
    tb = b.abs() + eta if adaptive_b else torch.ones_like(b)
    norm = torch.sqrt((tW * gW).pow(2).sum() + (tb * gb).pow(2).sum())
    return rho_W * tW**2 * gW / norm, rho_b * tb**2 * gb / norm


def sgd_reference(steps, *, lr, momentum, wd, **sam):
    x, y, W, b = problem()
    bufs = None
    for _ in range(steps):
        eW, eb = perturbation(W, b, *grads(W, b, x, y), **sam)
        gW, gb = grads(W + eW, b + eb, x, y)
        dW, db = gW + wd * W, gb + wd * b
        bufs = (dW, db) if bufs is None else (momentum * bufs[0] + dW, momentum * bufs[1] + db)
        W, b = W - lr * bufs[0], b - lr * bufs[1]
    return W, b


def adamw_reference(steps, *, lr, betas, eps, wd, **sam):
    x, y, W, b = problem()
    m = [torch.zeros_like(W), torch.zeros_like(b)]
    v = [torch.zeros_like(W), torch.zeros_like(b)]
    for t in range(1, steps + 1):
        eW, eb = perturbation(W, b, *grads(W, b, x, y), **sam)
        g = grads(W + eW, b + eb, x, y)
        new = []
        for i, w in enumerate((W, b)):
            w = w * (1 - lr * wd)
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g[i]
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g[i] ** 2
            mhat, vhat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            new.append(w - lr * mhat / (vhat.sqrt() + eps))
        W, b = new
    return W, b


def samopt_run(steps, base, groups, api, in_place, **kw):
    x, y, W, b = problem()
    model = nn.Linear(D, K).double()
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(b)
    params = [{"params": [model.weight], **groups[0]}, {"params": [model.bias], **groups[1]}]
    opt = samopt.SAM(params, base, perturb_in_place=in_place, **kw)

    def loss_backward():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if api == "closure":
            opt.step(loss_backward)
        else:
            loss_backward()
            opt.first_step(zero_grad=True)
            loss_backward()
            opt.second_step(zero_grad=True)
    return model.weight.detach(), model.bias.detach()


CASES = {
    "sam": ({}, {}, dict(rho_W=0.1, rho_b=0.1, adaptive_W=False, adaptive_b=False, eta=0.01)),
    "asam": (
        {"adaptive": True},
        {"adaptive": True},
        dict(rho_W=0.1, rho_b=0.1, adaptive_W=True, adaptive_b=True, eta=0.01),
    ),
    "mixed-groups": (  # ASAM weights with their own rho, plain SAM bias: one global norm
        {"adaptive": True, "rho": 0.5},
        {},
        dict(rho_W=0.5, rho_b=0.1, adaptive_W=True, adaptive_b=False, eta=0.01),
    ),
}


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("api", ["closure", "two-phase"])
@pytest.mark.parametrize("case", CASES)
def test_sgd_base_matches_hand_reference(case, api, in_place):
    gw, gb, sam = CASES[case]
    W_ref, b_ref = sgd_reference(3, lr=0.1, momentum=0.9, wd=1e-3, **sam)
    kw = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    W, b = samopt_run(3, torch.optim.SGD, (gw, gb), api, in_place, **kw)
    torch.testing.assert_close(W, W_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("api", ["closure", "two-phase"])
@pytest.mark.parametrize("case", CASES)
def test_adamw_base_matches_hand_reference(case, api, in_place):
    gw, gb, sam = CASES[case]
    W_ref, b_ref = adamw_reference(3, lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.05, **sam)
    W, b = samopt_run(3, torch.optim.AdamW, (gw, gb), api, in_place, rho=0.1, lr=0.01, weight_decay=0.05)
    torch.testing.assert_close(W, W_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("in_place", [False, True])
def test_first_step_moves_to_w_plus_e_and_second_step_returns_exactly(in_place):
    x, y, W, b = problem()
    model = nn.Linear(D, K).double()
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(b)
    storage = model.weight.data_ptr()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.2, perturb_in_place=in_place, lr=0.0)
    F.mse_loss(model(x), y).backward()
    opt.first_step()
    eW, eb = perturbation(W, b, *grads(W, b, x, y), rho_W=0.2, rho_b=0.2, adaptive_W=False, adaptive_b=False, eta=0)
    torch.testing.assert_close(model.weight.detach(), W + eW, rtol=0, atol=1e-15)
    torch.testing.assert_close(model.bias.detach(), b + eb, rtol=0, atol=1e-15)
    assert math.isclose(math.sqrt(eW.pow(2).sum() + eb.pow(2).sum()), 0.2, rel_tol=1e-12)
    assert model.weight.grad is None  # zero_grad=True
    # default: w + e lives in samopt's buffer and the parameter's own storage still holds w
    assert (model.weight.data_ptr() == storage) is in_place
    F.mse_loss(model(x), y).backward()
    opt.second_step()  # lr = 0: the weights must be w again, bit for bit, in their own storage
    assert torch.equal(model.weight.detach(), W) and torch.equal(model.bias.detach(), b)
    assert model.weight.data_ptr() == storage


@pytest.mark.parametrize("fused", [None, False, True], ids=["default-fused", "unfused", "fused"])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(base, fused):
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4} if base is torch.optim.SGD else {"lr": 0.01}
    x, y = vector_batch()
    ref_model, sam_model = mlp(), mlp()
    ref = base(ref_model.parameters(), **kw, fused=fused is not False)  # samopt's default: fused
    sam = samopt.SAM(sam_model.parameters(), base, rho=0.0, **kw, **({} if fused is None else {"fused": fused}))
    assert sam.base_optimizer.defaults["fused"] is (fused is not False)
    for _ in range(5):
        ref.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref.step()

        def closure():
            loss = F.cross_entropy(sam_model(x), y)
            loss.backward()
            return loss

        sam.step(closure)
    assert_equal_tensors(weights(sam_model), weights(ref_model))


def test_closure_and_two_phase_give_identical_weights():
    x, y = vector_batch()
    a, b = mlp(), mlp()
    opt_a = samopt.SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b = samopt.SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(4):

        def closure():
            loss = F.cross_entropy(a(x), y)
            loss.backward()
            return loss

        opt_a.step(closure)
        F.cross_entropy(b(x), y).backward()
        opt_b.first_step()
        F.cross_entropy(b(x), y).backward()
        opt_b.second_step()
    assert_equal_tensors(weights(a), weights(b))


def test_step_returns_the_loss_at_w():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    expected = F.cross_entropy(model(x), y).item()
    seen = []

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(loss.item())
        return loss

    assert opt.step(closure).item() == expected
    assert seen[0] == expected and seen[1] > expected  # the second call is at the perturbed point


def test_zero_gradient_gives_no_perturbation_and_no_nan():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    before = weights(model)
    calls = []

    def closure():
        loss = 0.0 * model(torch.ones(2, 5)).sum()
        loss.backward()
        calls.append(weights(model))
        return loss

    opt.step(closure)
    assert_equal_tensors(calls[1], before)  # the perturbed pass ran at w
    assert_equal_tensors(weights(model), before)  # zero gradient, zero update
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_parameters_without_grad_are_skipped_and_not_in_the_norm():
    x, y = vector_batch()
    model, ref = mlp(), mlp()
    model[0].weight.requires_grad_(False)  # frozen: never gets a .grad
    frozen = model[0].weight.detach().clone()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.0)
    F.cross_entropy(model(x), y).backward()
    grads_w = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.first_step()
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads_w.values()))
    for name, p in model.named_parameters():
        if name in grads_w:
            torch.testing.assert_close(p.detach(), dict(ref.named_parameters())[name] + 0.1 * grads_w[name] / norm)
    assert torch.equal(model[0].weight, frozen)
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert torch.equal(model[0].weight, frozen)


def test_mixed_dtype_parameters_are_grouped_and_exact():
    """fp64 and fp32 parameters in one optimizer: one global norm, each perturbed in its own dtype."""
    a = nn.Linear(3, 2).double()
    b = nn.Linear(2, 1)
    p64, p32 = list(a.parameters()), list(b.parameters())
    opt = samopt.SAM(p64 + p32, torch.optim.SGD, rho=0.3, lr=0.0)
    x = torch.randn(4, 3, dtype=torch.float64)
    b(a(x).float()).sum().backward()
    w = [p.detach().clone() for p in p64 + p32]
    g = [p.grad.clone() for p in p64 + p32]
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
    opt.first_step()
    for p, w0, g0 in zip(p64 + p32, w, g, strict=True):
        assert p.dtype == w0.dtype
        torch.testing.assert_close(p.detach(), w0 + 0.3 * g0 / norm)
    b(a(x).float()).sum().backward()
    opt.second_step()
    assert_equal_tensors([p.detach() for p in p64 + p32], w)
