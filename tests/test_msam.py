"""Momentum-SAM (samopt.MSAM): the base optimizer at rho 0, the weights at w - rho v / ||v|| against a hand-driven
reference, the true weights inside true_weights(), resume, GradScaler and refusals."""

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, mlp, vector_batch, weights

import samopt
from samopt.msam import momentum_direction_reference

LR, RHO, STEPS = 0.1, 0.5, 5


def batches(n: int = STEPS):
    return [vector_batch(seed) for seed in range(n)]


def msam_steps(opt, model, data, scaler=None) -> None:
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize(
    "base, kw",
    [(torch.optim.SGD, {"momentum": 0.9, "weight_decay": 5e-4}), (torch.optim.AdamW, {"weight_decay": 0.01})],
)
def test_rho_0_is_the_base_optimizer_bit_for_bit(base, kw):
    model, reference = mlp(), mlp()
    msam_steps(samopt.MSAM(model.parameters(), base, rho=0.0, lr=LR, **kw), model, batches())
    plain = base(reference.parameters(), lr=LR, **kw)
    for x, y in batches():
        plain.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        plain.step()
    assert_equal_tensors(weights(model), weights(reference))


@pytest.mark.parametrize("base, key", [(torch.optim.SGD, "momentum_buffer"), (torch.optim.Adam, "exp_avg")])
def test_the_gradient_is_taken_at_w_minus_rho_v_over_norm_v_and_the_update_applied_at_w(base, key):
    kw = {"momentum": 0.9} if base is torch.optim.SGD else {}
    model = mlp()
    opt = samopt.MSAM(model.parameters(), base, rho=RHO, lr=LR, **kw)
    # the reference: the base optimizer over the true weights, its gradients taken at w~ by hand
    true = [torch.nn.Parameter(w) for w in weights(mlp())]
    plain = base(true, lr=LR, **kw)
    probe = mlp()
    for k, (x, y) in enumerate(batches()):
        if k == 0:
            at = [t.detach() for t in true]  # no momentum yet: the first gradient is taken at w
        else:
            v = flat([plain.state[t][key] for t in true])
            tilde = momentum_direction_reference(flat([t.detach() for t in true]), v, RHO)
            at = list(torch.split(tilde, [t.numel() for t in true]))
            torch.testing.assert_close(flat(weights(model)), tilde, rtol=0, atol=1e-6)  # the model rests at w~
            assert float((tilde - flat([t.detach() for t in true])).norm()) == pytest.approx(RHO, rel=1e-5)
        with torch.no_grad():
            for p, a in zip(probe.parameters(), at, strict=True):
                p.copy_(a.reshape(p.shape))
        grads = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
        for t, g in zip(true, grads, strict=True):
            t.grad = g.clone()
        plain.step()
        msam_steps(opt, model, [(x, y)])
    with opt.true_weights():
        torch.testing.assert_close(flat(weights(model)), flat([t.detach() for t in true]), rtol=0, atol=1e-6)


def test_true_weights_puts_w_in_place_and_then_returns_to_the_same_w_tilde_bit_for_bit():
    model = mlp()
    opt = samopt.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    with opt.true_weights():  # before any step: nothing to move
        assert_equal_tensors(weights(model), weights(mlp()))
    msam_steps(opt, model, batches())
    tilde = weights(model)
    with opt.true_weights():
        w = weights(model)
    assert_equal_tensors(weights(model), tilde)
    dist = float(torch.linalg.vector_norm(flat(tilde) - flat(w)))
    assert dist == pytest.approx(RHO, rel=1e-5)


@pytest.mark.parametrize("in_place", [False, True])
def test_save_and_load_round_trip_continues_bit_exactly(in_place):
    def make(m):
        return samopt.MSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, perturb_in_place=in_place)

    model = mlp()
    opt = make(model)
    msam_steps(opt, model, batches())
    expected = weights(model)
    with opt.true_weights():
        expected_true = weights(model)

    model = mlp()
    opt = make(model)
    msam_steps(opt, model, batches()[:3])
    buf = io.BytesIO()
    with opt.true_weights():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed_model = mlp()
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(saved["opt"])
    msam_steps(resumed, resumed_model, batches()[3:])
    assert_equal_tensors(weights(resumed_model), expected)
    with resumed.true_weights():
        assert_equal_tensors(weights(resumed_model), expected_true)


def test_a_grad_scaler_steps_it_as_any_optimizer():
    # a power-of-two loss scale is exact in fp32: the run equals the one without a scaler, bit for bit
    scaled, plain = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    msam_steps(
        samopt.MSAM(scaled.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9), scaled, batches(), scaler
    )
    msam_steps(samopt.MSAM(plain.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9), plain, batches())
    assert_equal_tensors(weights(scaled), weights(plain))


def test_msam_refuses_what_has_no_momentum_and_a_foreign_state():
    with pytest.raises(TypeError, match="MSAM perturbs along the base optimizer's momentum: base_optimizer must be"):
        samopt.MSAM(mlp().parameters(), torch.optim.RMSprop, lr=LR)
    with pytest.raises(ValueError, match="MSAM over SGD needs momentum > 0"):
        samopt.MSAM(mlp().parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="rho must be a finite real number >= 0, got -1"):
        samopt.MSAM(mlp().parameters(), torch.optim.SGD, rho=-1, lr=LR, momentum=0.9)
    opt = samopt.MSAM(mlp().parameters(), torch.optim.SGD, lr=LR, momentum=0.9)
    for phase in (opt.first_step, opt.second_step, opt.perturbed):
        with pytest.raises(TypeError, match="MSAM has one forward/backward per step and no two-phase API"):
            phase()
    with pytest.raises(ValueError, match="not an MSAM state_dict"):
        opt.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=LR).state_dict())
    adam = samopt.MSAM(mlp().parameters(), torch.optim.Adam, lr=LR)
    with pytest.raises(ValueError, match="the state_dict is of an MSAM over Adam, this one is over SGD"):
        opt.load_state_dict(adam.state_dict())
