"""The engine's seams and protocol: toy policies defined here, checked against hand-computed updates.

None of these policies is part of samopt: each shows that a new method needs no change to the
engine, only a subclass of samopt.seams.Ascent, Descent or Schedule.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, mlp, vector_batch, weights
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import samopt
from samopt import seams

LR, RHO = 0.1, 0.2


def loss_at(model, values, x, y):
    """The loss and its gradient at parameter values ``values`` (a copy of the model; the model is untouched)."""
    copy = mlp()
    with torch.no_grad():
        for p, v in zip(copy.parameters(), values, strict=True):
            p.copy_(v)
    loss = F.cross_entropy(copy(x), y)
    return loss, torch.autograd.grad(loss, list(copy.parameters()))


def counting_closure(model, x, y, calls):
    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def drive(opt, closure, api):
    """One update through ``api``: ``step(closure)``, ``perturbed()`` or ``first_step``/``second_step``; returns
    whether it ascended (counted from the closure's calls)."""
    calls = []

    def counted():
        calls.append(1)
        return closure()

    if api == "closure":
        opt.step(counted)
        return len(calls) == 2
    opt.zero_grad()
    counted()
    if api == "perturbed":
        with opt.perturbed() as ascending:
            if ascending:
                counted()
    else:
        if opt.first_step():
            counted()
        opt.second_step()
    return len(calls) == 2


class SignAscent(seams.Ascent):
    """e = rho sign(g) / sqrt(N), N the number of entries: an L-infinity-flavoured ascent, with its step count."""

    def __init__(self):
        self.perturbations = 0

    def perturb(self, groups, norm, move):
        entries = sum(p.numel() for _, ps, _ in groups for p in ps)
        for group, params, grads in groups:

            def fill(idx, out, params=params, grads=grads, rho=group["rho"]):
                for j, i in enumerate(idx):
                    new = params[i] + rho * grads[i].sign() / math.sqrt(entries)
                    (params[i] if out is None else out[j]).copy_(new)

            move(params, fill)
        self.perturbations += 1

    def state_dict(self):
        return {"perturbations": self.perturbations}

    def check_state(self, state):
        if set(state) != {"perturbations"}:
            raise ValueError(f"not a SignAscent state: {state}")

    def load_state_dict(self, state):
        self.check_state(state)
        self.perturbations = state["perturbations"]


class MeanDescent(seams.Descent):
    """The update gradient (g + g_p) / 2."""

    needs_clean = True

    def combine(self, params, clean, grads):
        for c, g in zip(clean, grads, strict=True):
            g.add_(c).mul_(0.5)


class EveryOther(seams.Schedule):
    """Ascend on even-numbered updates only."""

    def ascend(self, step, grad_norm):
        return step % 2 == 0


def test_an_ascent_policy_needs_no_change_to_the_engine():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, ascent=SignAscent(), lr=LR)
    for _ in range(2):
        w = weights(model)
        _, g = loss_at(model, w, x, y)
        n = sum(t.numel() for t in w)
        _, g_p = loss_at(model, [wi + RHO * gi.sign() / math.sqrt(n) for wi, gi in zip(w, g, strict=True)], x, y)
        opt.step(counting_closure(model, x, y, []))
        for after, wi, gi in zip(model.parameters(), w, g_p, strict=True):
            torch.testing.assert_close(after.detach(), wi - LR * gi, rtol=1e-6, atol=1e-7)
    assert opt.state_dict()["samopt"]["ascent"] == {"perturbations": 2}  # its state travels with the optimizer
    fresh = samopt.SAM(mlp().parameters(), torch.optim.SGD, rho=RHO, ascent=SignAscent(), lr=LR)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.ascent.perturbations == 2
    with pytest.raises(ValueError, match="not a SignAscent state"):
        fresh.load_state_dict(samopt.SAM(mlp().parameters(), lr=LR).state_dict())


def test_a_descent_policy_needs_no_change_to_the_engine():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, descent=MeanDescent(), lr=LR)
    w = weights(model)
    _, g = loss_at(model, w, x, y)
    norm = math.sqrt(sum(float(gi.square().sum()) for gi in g))
    _, g_p = loss_at(model, [wi + RHO * gi / norm for wi, gi in zip(w, g, strict=True)], x, y)
    opt.step(counting_closure(model, x, y, []))
    for after, wi, gi, gpi in zip(model.parameters(), w, g, g_p, strict=True):
        torch.testing.assert_close(after.detach(), wi - LR * (gi + gpi) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("api", ["closure", "perturbed", "two-phase"])
def test_a_schedule_needs_no_change_to_the_engine_and_skips_the_second_pass(api):
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, schedule=EveryOther(), lr=LR)
    for update in range(3):
        calls = []
        w = weights(model)
        _, g = loss_at(model, w, x, y)
        if update % 2 == 0:  # SAM
            norm = math.sqrt(sum(float(gi.square().sum()) for gi in g))
            _, g = loss_at(model, [wi + RHO * gi / norm for wi, gi in zip(w, g, strict=True)], x, y)
        assert drive(opt, counting_closure(model, x, y, calls), api) == (update % 2 == 0)
        assert len(calls) == (2 if update % 2 == 0 else 1)  # a step that does not ascend costs one pass
        for after, wi, gi in zip(model.parameters(), w, g, strict=True):
            torch.testing.assert_close(after.detach(), wi - LR * gi, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [{}, {"fused": False}], ids=["default-fused", "unfused"])
def test_a_step_that_does_not_ascend_is_the_base_optimizer_bit_for_bit(fused):
    x, y = vector_batch()
    model, reference = mlp(), mlp()

    class Never(seams.Schedule):
        def ascend(self, step, grad_norm):
            return False

    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, schedule=Never(), lr=LR, momentum=0.9, **fused)
    sgd = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9, fused=fused.get("fused", True))
    for _ in range(3):
        opt.step(counting_closure(model, x, y, []))
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        sgd.step()
    assert_equal_tensors(weights(model), weights(reference))


def test_the_schedule_sees_the_update_count_and_the_clean_gradient_norm():
    x, y = vector_batch()
    model = mlp()
    seen = []

    class Recording(seams.Schedule):
        def ascend(self, step, grad_norm):
            seen.append((step, grad_norm()))
            return True

    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, schedule=Recording(), lr=LR)
    for _ in range(2):
        _, g = loss_at(model, weights(model), x, y)
        expected = math.sqrt(sum(float(gi.double().square().sum()) for gi in g))
        opt.step(counting_closure(model, x, y, []))
        assert seen[-1][1] == pytest.approx(expected, rel=1e-6)
    assert [s for s, _ in seen] == [0, 1]


def test_perturbed_restores_w_and_applies_no_update_when_the_block_raises():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    w = weights(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(KeyboardInterrupt), opt.perturbed() as ascending:
        assert ascending and not torch.equal(next(model.parameters()).detach(), w[0])  # at w + e
        raise KeyboardInterrupt
    assert_equal_tensors(weights(model), w)
    opt.state_dict()  # not left between the passes


def test_policies_must_be_policies():
    with pytest.raises(TypeError, match=r"ascent must be a samopt\.seams\.Ascent or None, got 3"):
        samopt.SAM(mlp().parameters(), ascent=3, lr=LR)
    with pytest.raises(TypeError, match=r"schedule must be a samopt\.seams\.Schedule or None"):
        samopt.SAM(mlp().parameters(), schedule=EveryOther, lr=LR)  # the class, not an instance
    with pytest.raises(ValueError, match=r"give mask= or ascent= \(a mask is an ascent policy\), not both"):
        samopt.SAM(mlp().parameters(), mask=samopt.masks.RandomMask(0.5), ascent=SignAscent(), lr=LR)


# ------------------------------------------------------------------ torch.optim conformance


@pytest.mark.parametrize("api", ["closure", "perturbed", "two-phase"])
def test_step_hooks_run_once_per_update_in_every_api(api):
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    seen = []
    opt.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(("pre", o is opt, o.param_groups[0]["params"][0].grad is not None))
    )
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o is opt, None)))
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global pre", None, None))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global post", None, None))),
    ]
    try:
        for _ in range(2):
            drive(opt, counting_closure(model, x, y, []), api)
    finally:
        for h in handles:
            h.remove()
    # the hooks of the SAM object see it, with the update gradient in .grad, around the base step
    one = [("pre", True, True), ("global pre", None, None), ("global post", None, None), ("post", True, None)]
    assert seen == one * 2


def test_state_dict_hooks_fire_as_on_a_torch_optimizer():
    opt = samopt.SAM(mlp().parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))

    def post(o, state):
        seen.append(("post", "samopt" in state))
        return {**state, "extra": 1}

    opt.register_state_dict_post_hook(post)
    state = opt.state_dict()
    assert seen == ["pre", ("post", True)] and state["extra"] == 1  # the post hook sees, and may replace, all of it

    def load_pre(o, state):
        seen.append("load pre")
        return {k: v for k, v in state.items() if k != "extra"}

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load post"))
    opt.load_state_dict(state)
    assert seen[2:] == ["load pre", "load post"]


def test_flags_after_rho_are_keyword_only():
    with pytest.raises(TypeError, match=r"SAM.__init__\(\) takes from 2 to 4 positional arguments but 5 were given"):
        samopt.SAM(mlp().parameters(), torch.optim.SGD, 0.05, True, lr=LR)


def test_a_samopt_state_dict_gives_a_plain_optimizer_only_its_own_state():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    opt.step(counting_closure(model, x, y, []))
    plain = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    plain.load_state_dict(opt.state_dict())
    assert not {"rho", "adaptive", "eta"} & set(plain.param_groups[0])  # no SAM key is copied into its groups
    assert torch.equal(
        plain.state[next(model.parameters())]["momentum_buffer"], opt.state[next(model.parameters())]["momentum_buffer"]
    )
