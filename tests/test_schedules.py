"""When a step ascends (samopt.schedules): each policy against SAM or the base optimizer bit for bit, its decisions
against hand-computed ones, closure calls per step, resume, GradScaler and argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, mlp, vector_batch, weights

import samopt
from samopt.schedules import AdaptiveAscent, EveryK, LatePhase, RandomAscent
from samopt.sub_batch import SubBatchAscent

LR, RHO = 0.1, 0.2
STEPS = 8


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [vector_batch(seed) for seed in range(n)]


def run_steps(opt, model, data, scaler=None) -> list[int]:
    """One ``opt.step(closure)`` per batch of ``data``; returns how often each step called the closure."""
    calls = []
    for x, y in data:
        n = []

        def closure(x=x, y=y, n=n):
            n.append(1)
            loss = F.cross_entropy(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        opt.step(closure, scaler=scaler)
        if scaler is not None:
            scaler.update()
        calls.append(len(n))
    return calls


def train(schedule, steps: int = STEPS, scaler=None, model=None, opt=None) -> tuple[list[int], torch.nn.Module]:
    """``steps`` updates of SGD-with-momentum SAM under ``schedule``; returns the closure calls of each step."""
    model = model or mlp()
    opt = opt or samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, schedule=schedule, lr=LR, momentum=0.9)
    return run_steps(opt, model, batches(steps), scaler), model


def base(steps: int = STEPS) -> torch.nn.Module:
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, fused=True)  # as SAM builds its base optimizer
    for x, y in batches(steps):
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
    return model


@pytest.mark.parametrize(
    "schedule",
    [EveryK(1), RandomAscent(1.0), AdaptiveAscent(STEPS, lambda1=-1e9, lambda2=-1e9), LatePhase(0)],
    ids=repr,
)
def test_a_schedule_that_always_ascends_is_sam_bit_for_bit(schedule):
    calls, model = train(schedule)
    _, sam = train(None)
    assert calls == [2] * STEPS
    assert_equal_tensors(weights(model), weights(sam))


@pytest.mark.parametrize("schedule", [RandomAscent(0.0), LatePhase(STEPS)], ids=repr)
def test_a_schedule_that_never_ascends_is_the_base_optimizer_bit_for_bit(schedule):
    calls, model = train(schedule)
    assert calls == [1] * STEPS
    assert_equal_tensors(weights(model), weights(base()))


def test_every_k_and_late_phase_call_the_closure_twice_only_on_their_steps():
    assert train(EveryK(3))[0] == [2, 1, 1, 2, 1, 1, 2, 1]
    assert train(LatePhase(5))[0] == [1, 1, 1, 1, 1, 2, 2, 2]
    # late phase before its switch is the base optimizer: its first 5 updates equal 5 of SGD's
    _, model = train(LatePhase(5), steps=5)
    assert_equal_tensors(weights(model), weights(base(5)))


def test_random_ascent_draws_a_pure_function_of_seed_and_step_at_its_rate():
    a, b, other = RandomAscent(0.3, seed=4), RandomAscent(0.3, seed=4), RandomAscent(0.3, seed=5)
    draws = [a.ascend(t, lambda: 1.0) for t in range(4000)]
    assert draws == [b.ascend(t, lambda: 1.0) for t in range(4000)]  # another object, the same seed: the same draws
    assert draws != [other.ascend(t, lambda: 1.0) for t in range(4000)]
    assert [a.ascend(t, lambda: 1.0) for t in range(3999, -1, -1)] == draws[::-1]  # no hidden stream
    assert abs(sum(draws) / 4000 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)  # a binomial's 4 standard deviations


def test_random_ascent_follows_a_half_cosine_from_p_to_p_end():
    s = RandomAscent(1.0, p_end=0.2, total_steps=100)
    assert [s.probability(t) for t in (0, 50, 100, 1000)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert s.probability(25) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    rising = RandomAscent(0.0, p_end=1.0, total_steps=10)
    assert [rising.ascend(t, lambda: 1.0) for t in (0, 10, 11)] == [False, True, True]  # p = 0 and p = 1 exactly


def test_adaptive_ascent_decides_as_the_hand_computed_statistics_say():
    # decay 0.5, c = 0: ascend when n >= mu after mu's update. n = ||g||^2 = 1, 4, 1, 9:
    # mu = 1 (first step), 2.5, 1.75, 5.375; var = 0, 1.125, 0.84375, ...
    s = AdaptiveAscent(10, lambda1=0.0, lambda2=0.0, decay=0.5)
    assert [s.ascend(t, lambda n=n: n) for t, n in enumerate((1.0, 2.0, 1.0, 3.0))] == [True, True, False, True]
    assert s.mean == 5.375
    assert s.var == pytest.approx(0.5 * 0.84375 + 0.5 * (9 - 5.375) ** 2)
    # with c > 0 the spread counts: mu = 2.5, sqrt(var) = 1.0607, so 4 >= 2.5 + 1.0 * 1.0607 but not + 2.0 * 1.0607
    for c, expected in ((1.0, True), (2.0, False)):
        s = AdaptiveAscent(10, lambda1=c, lambda2=c, decay=0.5)
        s.ascend(0, lambda: 1.0)
        assert s.ascend(1, lambda: 2.0) is expected
    ramp = AdaptiveAscent(100, lambda1=-1.0, lambda2=2.0)
    assert [ramp.threshold(t) for t in (0, 50, 100, 500)] == pytest.approx([-1.0, 0.5, 2.0, 2.0])


def test_adaptive_ascent_ignores_a_non_finite_norm_and_keeps_its_state():
    s = AdaptiveAscent(10)
    s.ascend(0, lambda: 2.0)
    before = s.state_dict()
    assert s.ascend(1, lambda: math.inf) is False
    assert s.ascend(1, lambda: math.nan) is False
    assert s.state_dict() == before == {"mean": 4.0, "var": 0.0}


@pytest.mark.parametrize(
    "make",
    [lambda: EveryK(3), lambda: RandomAscent(0.5, seed=1), lambda: RandomAscent(0.9, p_end=0.1, total_steps=8),
     lambda: AdaptiveAscent(STEPS), lambda: LatePhase(3)],
)  # fmt: skip
def test_resume_mid_run_is_bit_exact(make):
    calls, straight = train(make())
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, schedule=make(), lr=LR, momentum=0.9)
    first, _ = train(None, steps=3, model=model, opt=opt)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    resumed_model = mlp()
    resumed_model.load_state_dict(saved["model"])
    resumed = samopt.SAM(resumed_model.parameters(), torch.optim.SGD, rho=RHO, schedule=make(), lr=LR, momentum=0.9)
    resumed.load_state_dict(saved["opt"])
    rest = run_steps(resumed, resumed_model, batches()[3:])
    assert first + rest == calls
    assert_equal_tensors(weights(resumed_model), weights(straight))


def test_adaptive_state_round_trips_and_a_bad_state_is_refused():
    s = AdaptiveAscent(10)
    s.ascend(0, lambda: 1.5)
    s.ascend(1, lambda: 0.5)
    t = AdaptiveAscent(10)
    t.load_state_dict(s.state_dict())
    assert (t.mean, t.var) == (s.mean, s.var)
    for bad in ({}, {"mean": 1.0}, {"mean": "x", "var": 0.0}, {"mean": 1.0, "var": -1.0}, {**s.state_dict(), "x": 1}):
        with pytest.raises(ValueError, match="AdaptiveAscent's state must be"):
            t.load_state_dict(bad)
    with pytest.raises(ValueError, match="EveryK keeps no state"):
        EveryK(2).load_state_dict({"mean": 1.0, "var": 0.0})


def test_a_step_that_does_not_ascend_unscales_through_the_grad_scaler():
    # a power-of-two loss scale is exact in fp32: with a GradScaler the run equals the one without, bit for bit
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    calls, scaled = train(EveryK(2), scaler=scaler)
    _, plain = train(EveryK(2))
    assert calls == [2, 1] * (STEPS // 2)
    assert_equal_tensors(weights(scaled), weights(plain))


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: EveryK(0), ValueError, "k must be an integer >= 1, got 0"),
        (lambda: EveryK(2.0), TypeError, "k must be an integer >= 1, got 2.0"),
        (lambda: RandomAscent(1.5), ValueError, r"p must be a real number in \[0, 1\], got 1.5"),
        (lambda: RandomAscent(0.5, p_end=-0.1, total_steps=3), ValueError, r"p_end must be a real number in \[0, 1\]"),
        (lambda: RandomAscent(0.5, p_end=0.1), ValueError, "p_end and total_steps go together"),
        (lambda: RandomAscent(0.5, total_steps=10), ValueError, "p_end and total_steps go together"),
        (lambda: RandomAscent(0.5, seed=0.5), TypeError, "seed must be an int"),
        (lambda: AdaptiveAscent(0), ValueError, "total_steps must be an integer >= 1, got 0"),
        (lambda: AdaptiveAscent(10, lambda1=math.nan), ValueError, "lambda1 must be a finite real number"),
        (lambda: AdaptiveAscent(10, lambda2=math.inf), ValueError, "lambda2 must be a finite real number"),
        (lambda: AdaptiveAscent(10, decay=1.0), ValueError, r"decay must be a real number in \[0, 1\), got 1.0"),
        (lambda: LatePhase(-1), ValueError, r"start must be an integer >= 0 \(a step index\), got -1"),
        (lambda: LatePhase(True), ValueError, "start must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_work_counts_the_passes_of_each_update():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, schedule=EveryK(3), lr=LR)
    assert opt.work.passes_per_step == 0.0 and opt.work.ascent_fraction == 0.0  # no division by zero
    train(None, steps=3, model=model, opt=opt)
    before = opt.work.copy()
    train(None, steps=3, model=model, opt=opt)
    assert (opt.work.steps, opt.work.ascents, opt.work.clean_passes, opt.work.perturbed_passes) == (6, 2, 6, 2)
    assert opt.work.passes_per_step == 8 / 6 and opt.work.ascent_fraction == 1 / 3
    epoch = opt.work.since(before)
    assert (epoch.steps, epoch.ascents, epoch.passes_per_step) == (3, 1, 4 / 3)
    assert epoch.as_dict() == {
        "steps": 3, "ascents": 1, "clean_passes": 3.0, "perturbed_passes": 1.0, "extra_passes": 0.0,
        "extra_forwards": 0.0, "passes_per_step": 4 / 3, "ascent_fraction": 1 / 3, "forwards_per_step": 0.0,
    }  # fmt: skip
    sam = samopt.SAM(mlp().parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sam.load_state_dict(opt.state_dict())
    assert sam.work == opt.work  # carried by the state_dict: a resumed run's totals go on


@pytest.mark.parametrize(("estimator", "extra"), [("probe", (0.0, 6.0)), ("logit", (0.0, 0.0)), ("exact", (2.0, 0.0))])
def test_delta_sam_counts_its_probe_forwards_and_its_per_example_backward(estimator, extra):
    model = mlp()
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=RHO, estimator=estimator, alpha=1.0, lr=LR)
    for x, y in batches(2):

        def closure(x=x, y=y):
            logits = model(x)
            return F.cross_entropy(logits, y, reduction="none"), logits

        opt.step(closure)
    assert (opt.work.steps, opt.work.perturbed_passes) == (2, 2)
    assert (opt.work.extra_passes, opt.work.extra_forwards) == extra  # 3 probes a step by default


def test_delta_sam_refuses_a_schedule():
    with pytest.raises(TypeError, match="DeltaSAM takes no schedule: its clean backward is of the reweighted loss"):
        samopt.DeltaSAM(mlp().parameters(), torch.optim.SGD, schedule=EveryK(2), lr=LR)


def test_a_state_dict_without_work_loads_with_none_counted_and_a_bad_one_is_refused():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    train(None, steps=2, model=model, opt=opt)
    state = opt.state_dict()
    older = {**state, "samopt": {k: v for k, v in state["samopt"].items() if k != "work"}}
    fresh = samopt.SAM(mlp().parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    fresh.load_state_dict(older)
    assert fresh.work == samopt.Work()
    for bad in ({"steps": 1}, {**state["samopt"]["work"], "steps": -1}, {**state["samopt"]["work"], "ascents": "2"}):
        with pytest.raises(ValueError, match="the state_dict's work entry must hold"):
            fresh.load_state_dict({**state, "samopt": {**state["samopt"], "work": bad}})
    assert fresh.work == samopt.Work()  # nothing changed


# ------------------------------------------------------------------ LookSAM


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def grads_at(values, x, y) -> list[torch.Tensor]:
    model = mlp()
    with torch.no_grad():
        for p, v in zip(model.parameters(), values, strict=True):
            p.copy_(v)
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


def test_looksam_refreshes_as_sam_and_reuses_the_hand_computed_direction():
    model = mlp()
    opt = samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=2, alpha=0.7, lr=LR)
    (x0, y0), (x1, y1) = batches(2)
    w = weights(model)
    g = grads_at(w, x0, y0)
    norm = flat(g).double().norm().item()
    g_p = grads_at([wi + RHO * gi / norm for wi, gi in zip(w, g, strict=True)], x0, y0)
    assert run_steps(opt, model, [(x0, y0)]) == [2]  # the refresh step is SAM's
    for after, wi, gpi in zip(model.parameters(), w, g_p, strict=True):
        torch.testing.assert_close(after.detach(), wi - LR * gpi, rtol=0, atol=1e-7)
    # g_v = g_p - (<g_p, g> / ||g||^2) g, over the whole vector
    G, GP = flat(g).double(), flat(g_p).double()
    g_v = GP - (GP @ G) / (G @ G) * G
    assert abs(float(g_v @ G)) < 1e-9 and float(g_v.norm()) > 1e-4  # orthogonal to g, and not zero
    w1 = weights(model)
    h = flat(grads_at(w1, x1, y1)).double()
    expected = flat(w1).double() - LR * (h + 0.7 * h.norm() / g_v.norm() * g_v)
    assert run_steps(opt, model, [(x1, y1)]) == [1]  # the reuse step: one pass
    torch.testing.assert_close(flat(weights(model)).double(), expected, rtol=0, atol=1e-6)


def test_the_orthogonal_part_agrees_with_the_papers_formula():
    g = [torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), torch.randn(5)]
    g_p = [t + 0.3 * torch.randn(t.shape) for t in g]
    g_v, norm = samopt.looksam.reuse_orthogonal(g, g_p)
    reference = samopt.looksam.reuse_orthogonal_reference(flat(g), flat(g_p))
    torch.testing.assert_close(flat(g_v), reference, rtol=1e-5, atol=1e-6)
    assert norm == pytest.approx(float(reference.norm()), rel=1e-5)


def test_looksam_with_k_1_is_sam_and_a_zero_direction_gives_the_plain_gradient():
    model = mlp()
    opt = samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=1, lr=LR, momentum=0.9)
    assert run_steps(opt, model, batches()) == [2] * STEPS
    assert_equal_tensors(weights(model), weights(train(None)[1]))
    # rho = 0: g_p = g, so g_v = 0 and every reuse step is the base optimizer's (no NaN from 0 / 0)
    model = mlp()
    opt = samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=0.0, k=4, lr=LR, momentum=0.9)
    assert run_steps(opt, model, batches()) == [2, 1, 1, 1] * 2
    assert opt.descent.norm == 0.0
    assert_equal_tensors(weights(model), weights(base()))


def test_looksam_resumes_bit_exactly_with_its_cached_direction():
    make = lambda m: samopt.LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR, momentum=0.9)  # noqa: E731
    model = mlp()
    straight = run_steps(make(model), model, batches())
    expected = weights(model)
    model = mlp()
    opt = make(model)
    first = run_steps(opt, model, batches()[:4])
    saved = torch.load(_roundtrip(opt.state_dict()), weights_only=False)
    resumed_model = mlp()
    with torch.no_grad():
        for p, v in zip(resumed_model.parameters(), weights(model), strict=True):
            p.copy_(v)
    resumed = make(resumed_model)
    resumed.load_state_dict(saved)
    assert first + run_steps(resumed, resumed_model, batches()[4:]) == straight == [2, 1, 1] * 2 + [2, 1]
    assert_equal_tensors(weights(resumed_model), expected)


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_looksam_reuses_unscaled_gradients_under_a_grad_scaler():
    # a power-of-two loss scale is exact in fp32: with a GradScaler the run equals the one without, bit for bit
    def run(scaler):
        model = mlp()
        opt = samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR, momentum=0.9)
        train(None, scaler=scaler, model=model, opt=opt)
        return weights(model)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    assert_equal_tensors(run(scaler), run(None))


def test_looksam_arguments_and_state_are_checked():
    with pytest.raises(ValueError, match="alpha must be a finite real number >= 0, got -1"):
        samopt.LookSAM(mlp().parameters(), alpha=-1)
    with pytest.raises(ValueError, match="give k or schedule=, not both"):
        samopt.LookSAM(mlp().parameters(), k=3, schedule=EveryK(2))
    ae = samopt.LookSAM(mlp().parameters(), schedule=AdaptiveAscent(10), lr=LR)  # AE-LookSAM
    assert isinstance(ae.schedule, AdaptiveAscent)
    opt = samopt.LookSAM(mlp().parameters(), torch.optim.SGD, lr=LR)
    state = opt.state_dict()
    bad = {"cache": {0: torch.zeros(2, 2)}, "norm": 1.0}
    with pytest.raises(ValueError, match=r"direction for parameter 0 has shape \(2, 2\), the parameter \(7, 5\)"):
        opt.load_state_dict({**state, "samopt": {**state["samopt"], "descent": bad}})
    with pytest.raises(ValueError, match="ReuseOrthogonal's state must be"):
        opt.load_state_dict({**state, "samopt": {**state["samopt"], "descent": {"cache": {}, "norm": -1.0}}})


# ------------------------------------------------------------------ ascent on a sub-batch


def pass_closure(model, x, y, seen):
    def closure(p):
        seen.append(p)
        xb, yb = p.take(x, y)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    return closure


def test_sub_batch_ascent_with_m_1_is_sam_bit_for_bit():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, ascent=SubBatchAscent(1), lr=LR, momentum=0.9)
    for x, y in batches():
        opt.step(pass_closure(model, x, y, []))
    assert_equal_tensors(weights(model), weights(train(None)[1]))


def test_sub_batch_ascent_perturbs_along_the_sub_batch_gradient_and_descends_on_the_whole_batch():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, ascent=SubBatchAscent(4), lr=LR)
    x, y = vector_batch(n=8)
    w = weights(model)
    g = grads_at(w, x[:2], y[:2])  # the first quarter of the batch
    norm = flat(g).double().norm().item()
    h = grads_at([wi + RHO * gi / norm for wi, gi in zip(w, g, strict=True)], x, y)  # all 8 examples at w + e
    seen = []
    loss = opt.step(pass_closure(model, x, y, seen))
    assert [(p.kind, p.sub_batches) for p in seen] == [("clean", 4), ("perturbed", 1)]
    assert loss == F.cross_entropy(mlp()(x[:2]), y[:2])  # the clean pass's loss, on its quarter
    for after, wi, hi in zip(model.parameters(), w, h, strict=True):
        torch.testing.assert_close(after.detach(), wi - LR * hi, rtol=0, atol=1e-7)
    assert (opt.work.clean_passes, opt.work.perturbed_passes, opt.work.passes_per_step) == (0.25, 1.0, 1.25)


def test_sub_batch_ascent_keeps_a_masks_ascent_and_state():
    mask = samopt.masks.RandomMask(0.5, seed=3)
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, ascent=SubBatchAscent(2, inner=mask), lr=LR)
    x, y = vector_batch()
    opt.step(pass_closure(model, x, y, []))
    assert opt.mask_density() == pytest.approx(0.5, abs=0.02)
    again = samopt.SAM(
        mlp().parameters(),
        torch.optim.SGD,
        rho=RHO,
        ascent=SubBatchAscent(2, inner=samopt.masks.RandomMask(0.5)),
        lr=LR,
    )
    again.load_state_dict(opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.ascent.inner.masks, mask.masks, strict=True))


def test_sub_batch_ascent_refuses_what_cannot_cut_the_batch():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, ascent=SubBatchAscent(2), lr=LR)
    x, y = vector_batch()
    with pytest.raises(TypeError, match=r"runs the clean pass on 1/2 of the batch, which only the closure can cut"):
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    with pytest.raises(ValueError, match="the batch has 8 rows, fewer than the 9 sub-batches of the ascent"):
        samopt.seams.Pass("clean", 9).take(x, y)
    with pytest.raises(ValueError, match="needs every step to ascend"):
        samopt.SAM(mlp().parameters(), ascent=SubBatchAscent(2), schedule=EveryK(2), lr=LR)
    with pytest.raises(ValueError, match="m must be an integer >= 1, got 0"):
        SubBatchAscent(0)
    with pytest.raises(TypeError, match="inner is already a SubBatchAscent"):
        SubBatchAscent(2, inner=SubBatchAscent(2))
    assert samopt.seams.Pass("clean", 3).take(torch.arange(7)).tolist() == [0, 1]  # 7 // 3 rows


def test_a_plain_closure_and_one_with_defaults_are_called_without_the_pass():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    x, y = vector_batch()
    calls = []

    def closure(x=x, y=y):
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == 2
