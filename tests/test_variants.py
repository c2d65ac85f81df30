"""GSAM, Friendly-SAM, VaSSO and WSAM: each update against plain tensor math written here, the settings that are
SAM bit for bit, exact resume, an overflow kept out of the EMAs, and bad arguments named."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, mlp, reloaded, vector_batch, weights
from torch.func import functional_call

import samopt
from samopt.profiling import count_ops

RHO, LR, STEPS = 0.1, 0.1, 4
BASES = {
    "sgd": (torch.optim.SGD, {"lr": LR, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 1e-2}),
}


def batches(n: int = STEPS):
    return [vector_batch(seed) for seed in range(n)]


def grads_at(model, values, x, y):
    """The gradient of the loss at the weights ``values`` (float64 copies), as a list."""
    names = [n for n, _ in model.named_parameters()]
    ws = [v.detach().double().requires_grad_() for v in values]
    loss = F.cross_entropy(functional_call(model.double(), dict(zip(names, ws, strict=True)), (x.double(),)), y)
    model.float()
    return list(torch.autograd.grad(loss, ws))


def norm(vs):
    return math.sqrt(sum(float((v * v).sum()) for v in vs))


def dot(a, b):
    return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))


def reference(base, direction, update, *, rho_of=lambda lr: RHO, after=None, scheduler=None):
    """Plain SAM-family steps: ``direction(t, g)`` gives the ascent direction, ``update(g, g_p)`` the update
    gradient, ``after(params, g, g_p, lr)`` a move after the base step; the base step is torch's own, on a copy."""
    cls, kw = BASES[base]
    model = mlp()
    opt = cls(model.parameters(), **kw, fused=True)
    sched = scheduler(opt) if scheduler else None
    for t, (x, y) in enumerate(batches()):
        w = [p.detach().double() for p in model.parameters()]
        g = grads_at(model, w, x, y)
        d = direction(t, g)
        lr = opt.param_groups[0]["lr"]
        n = norm(d)
        g_p = grads_at(model, [wi + rho_of(lr) * di / n for wi, di in zip(w, d, strict=True)], x, y)
        for p, u in zip(model.parameters(), update(g, g_p), strict=True):
            p.grad = u.float()
        opt.step()
        if after is not None:
            with torch.no_grad():
                after(list(model.parameters()), g, g_p, opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step()
    return weights(model)


def run(make, steps: int = STEPS, scheduler=None, reload=False):
    model = mlp()
    opt = make(model)
    if reload:  # as accelerate's prepare does: the state reloaded, which replaces the group dicts
        opt.load_state_dict(opt.state_dict())
    sched = scheduler(opt) if scheduler else None
    for x, y in batches(steps):

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if sched is not None:
            sched.step()
    return model, opt


def close(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", list(BASES))
def test_vasso_is_sam_along_the_ema_that_weights_the_new_gradient_by_theta(base):
    theta, ema = 0.4, []

    def direction(t, g):
        ema[:] = g if t == 0 else [(1 - theta) * d + theta * gi for d, gi in zip(ema, g, strict=True)]
        return ema

    cls, kw = BASES[base]
    model, _ = run(lambda m: samopt.VaSSO(m.parameters(), cls, RHO, theta=theta, **kw))
    close(weights(model), reference(base, direction, lambda g, g_p: g_p))


@pytest.mark.parametrize("base", list(BASES))
def test_friendly_sam_subtracts_the_ema_before_this_step_and_averages_the_raw_gradient(base):
    sigma, lmbda, m = 0.7, 0.6, []

    def direction(t, g):
        if t == 0:
            m[:] = g
            return g
        d = [gi - sigma * mi for gi, mi in zip(g, m, strict=True)]  # the EMA of the steps before
        m[:] = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(m, g, strict=True)]  # of the raw g
        return d

    cls, kw = BASES[base]
    model, _ = run(lambda mo: samopt.FriendlySAM(mo.parameters(), cls, RHO, sigma=sigma, lmbda=lmbda, **kw))
    close(weights(model), reference(base, direction, lambda g, g_p: g_p))


@pytest.mark.parametrize("base", list(BASES))
def test_gsam_descends_along_the_official_formula_with_rho_following_the_lr(base):
    alpha, rho_min, eps = 0.3, 0.02, 1e-12
    cls, kw = BASES[base]
    lr_max = kw["lr"]

    def official(g, g_p):  # juntang-zhuang/GSAM gsam/gsam.py, gradient_decompose, in plain math
        ng, np_ = norm(g), norm(g_p)
        cos = dot(g, g_p) / (np_ * ng + eps)
        vertical = [gi - cos * ng * gp / (np_ + eps) for gi, gp in zip(g, g_p, strict=True)]
        return [gp - alpha * v for gp, v in zip(g_p, vertical, strict=True)]

    def decay(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - 0.2 * t)

    model, opt = run(
        lambda m: samopt.GSAM(m.parameters(), cls, RHO, alpha=alpha, rho_min=rho_min, **kw), scheduler=decay
    )
    expected = reference(
        base,
        lambda t, g: g,
        official,
        rho_of=lambda lr: rho_min + (RHO - rho_min) * lr / lr_max,
        scheduler=decay,
    )
    close(weights(model), expected)
    assert opt.param_groups[0]["rho"] == pytest.approx(rho_min + (RHO - rho_min) * (1 - 0.2 * (STEPS - 1)))


@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("base", list(BASES))
def test_wsam_weights_the_sharpness_term_decoupled_or_in_the_gradient(base, decouple):
    gamma = 0.8
    alpha = gamma / (1 - gamma)
    cls, kw = BASES[base]
    model, _ = run(lambda m: samopt.WSAM(m.parameters(), cls, RHO, gamma=gamma, decouple=decouple, **kw))
    if decouple:

        def after(params, g, g_p, lr):
            for p, gi, gp in zip(params, g, g_p, strict=True):
                p.sub_((lr * alpha * (gp - gi)).float())

        expected = reference(base, lambda t, g: g, lambda g, g_p: g, after=after)
    else:
        expected = reference(
            base, lambda t, g: g, lambda g, g_p: [gi + alpha * (gp - gi) for gi, gp in zip(g, g_p, strict=True)]
        )
    close(weights(model), expected)


DEGENERATE = {
    "vasso theta 1": lambda m: samopt.VaSSO(m.parameters(), torch.optim.SGD, RHO, theta=1.0, lr=LR, momentum=0.9),
    "friendly sigma 0": lambda m: samopt.FriendlySAM(
        m.parameters(), torch.optim.SGD, RHO, sigma=0.0, lr=LR, momentum=0.9
    ),
    "gsam alpha 0": lambda m: samopt.GSAM(m.parameters(), torch.optim.SGD, RHO, alpha=0.0, lr=LR, momentum=0.9),
    "wsam coupled gamma 0.5": lambda m: samopt.WSAM(
        m.parameters(), torch.optim.SGD, RHO, gamma=0.5, decouple=False, lr=LR, momentum=0.9
    ),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_the_settings_that_are_sam_give_sam_bit_for_bit(name):
    model, _ = run(DEGENERATE[name])
    sam, _ = run(lambda m: samopt.SAM(m.parameters(), torch.optim.SGD, RHO, lr=LR, momentum=0.9))
    assert_equal_tensors(weights(model), weights(sam))


VARIANTS = {
    "vasso": lambda m: samopt.VaSSO(m.parameters(), torch.optim.SGD, RHO, theta=0.5, lr=LR, momentum=0.9),
    "friendly": lambda m: samopt.FriendlySAM(m.parameters(), torch.optim.AdamW, RHO, lmbda=0.8, lr=0.01),
    "gsam": lambda m: samopt.GSAM(m.parameters(), torch.optim.SGD, RHO, alpha=0.3, rho_min=0.01, lr=LR, momentum=0.9),
    "wsam": lambda m: samopt.WSAM(m.parameters(), torch.optim.SGD, RHO, gamma=0.9, lr=LR, momentum=0.9),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_resumed_run_continues_bit_for_bit(name):
    make = VARIANTS[name]
    straight, _ = run(make, steps=6)
    model, opt = run(make, steps=3)
    model, opt = reloaded(model, opt, lambda: _fresh(make))
    for x, y in batches(6)[3:]:

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    assert_equal_tensors(weights(model), weights(straight))


def test_gsam_rho_follows_the_lr_of_the_groups_after_a_load_state_dict():
    halving = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    model, opt = run(VARIANTS["gsam"], scheduler=halving)
    reloaded_model, reloaded_opt = run(VARIANTS["gsam"], scheduler=halving, reload=True)
    assert_equal_tensors(weights(reloaded_model), weights(model))
    rho = 0.01 + (RHO - 0.01) * 0.5**3  # the fourth step's rho: lr halved three times, rho_min 0.01
    assert reloaded_opt.param_groups[0]["rho"] == opt.param_groups[0]["rho"] == pytest.approx(rho, rel=1e-12)


def _fresh(make):
    model = mlp()
    return model, make(model)


#: A policy's per-parameter tensors in the state dict: (variant, seam, key) where they are saved.
SAVED_DIRECTIONS = {
    "vasso": ("ascent", "buffers", "EMADirection's state"),
    "friendly": ("ascent", "buffers", "FriendlyDirection's state"),
    "looksam": ("descent", "cache", "ReuseOrthogonal's cached direction"),
}


@pytest.mark.parametrize("name", list(SAVED_DIRECTIONS))
def test_a_saved_direction_of_another_shape_is_refused_before_anything_changes(name):
    make = {
        **VARIANTS,
        "looksam": lambda m: samopt.LookSAM(m.parameters(), torch.optim.SGD, RHO, k=2, lr=LR, momentum=0.9),
    }[name]
    seam, key, what = SAVED_DIRECTIONS[name]
    _, source = run(make, steps=3)
    state = source.state_dict()
    assert set(state["samopt"][seam][key]) == set(range(4))  # every parameter has its direction saved
    state["samopt"][seam][key][2] = torch.zeros(5, 3)  # the third parameter is a (3, 7) weight
    _, opt = run(make, steps=1)  # a run that has its own state, which the refused load must leave as it is
    before = opt.state_dict()
    with pytest.raises(ValueError, match=rf"^{what} for parameter 2 has shape \(5, 3\), the parameter \(3, 7\)$"):
        opt.load_state_dict(state)
    assert_equal_tensors(_tensors(opt.state_dict(), seam, key), _tensors(before, seam, key))


def _tensors(state, seam, key):
    """The base optimizer's per-parameter tensors and the seam's saved directions, in a fixed order."""
    base = [v for i in sorted(state["state"]) for _, v in sorted(state["state"][i].items())]
    return base + [state["samopt"][seam][key][i] for i in sorted(state["samopt"][seam][key])]


@pytest.mark.parametrize("name", ["vasso", "friendly"])
def test_an_fp16_overflow_skips_the_step_and_never_reaches_the_ema(name):
    model = mlp()
    opt = VARIANTS[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = vector_batch()

    def closure(factor=1.0):
        def go():
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss * factor).backward()
            return loss

        return go

    opt.step(closure(), scaler=scaler)
    scaler.update()
    ema = {i: b.clone() for i, b in opt.ascent.buffers.items()}
    w = weights(model)
    opt.step(closure(1e38), scaler=scaler)  # the clean pass overflows
    scaler.update()
    assert_equal_tensors(weights(model), w)
    assert ema.keys() == opt.ascent.buffers.keys()
    assert_equal_tensors(list(opt.ascent.buffers.values()), list(ema.values()))
    assert scaler.get_scale() == 2.0**9


def test_bad_arguments_are_refused_naming_them():
    params = list(mlp().parameters())
    cases = [
        (lambda: samopt.GSAM(params, alpha=-0.1, lr=LR), r"alpha must be a finite real number >= 0, got -0\.1"),
        (
            lambda: samopt.GSAM(params, rho=0.05, rho_min=0.1, lr=LR),
            r"rho_min must be at most rho \(the schedule's rho_max\), got rho_min=0\.1 > "
            r"param_groups\[0\]\['rho'\]=0\.05",
        ),
        (
            lambda: samopt.GSAM(params, rho_min=0.01, lr_min=0.2, lr=0.1),
            r"lr_min must be below lr \(the schedule's lr_max\), got lr_min=0\.2 >= param_groups\[0\]\['lr'\]=0\.1",
        ),
        (lambda: samopt.FriendlySAM(params, sigma=-1.0, lr=LR), r"sigma must be a finite real number >= 0, got -1\.0"),
        (lambda: samopt.FriendlySAM(params, lmbda=1.0, lr=LR), r"lmbda must be a real number in \[0, 1\), got 1\.0"),
        (lambda: samopt.VaSSO(params, theta=1.5, lr=LR), r"theta must be a real number in \[0, 1\], got 1\.5"),
        (lambda: samopt.VaSSO(params, theta=0.0, lr=LR), r"theta must be a real number in \(0, 1\], got 0"),
        (lambda: samopt.WSAM(params, gamma=1.0, lr=LR), r"gamma must be a real number in \[0, 1\), got 1\.0"),
        (lambda: samopt.WSAM(params, decouple="yes", lr=LR), r"decouple must be"),
    ]
    for make, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            make()


@pytest.mark.parametrize(
    "name, syncs",
    [
        ("gsam", 0),
        ("wsam-coupled", 0),
        ("wsam", 1),  # the sharpness step after the base step cannot be skipped on the device: the flag is read
        ("vasso", 1),  # an EMA that an overflow must not reach: the clean gradient is checked on the host
        ("friendly", 1),
    ],
)
def test_host_reads_per_step_are_the_documented_ones(name, syncs):
    make = VARIANTS.get(name) or (
        lambda m: samopt.WSAM(m.parameters(), torch.optim.SGD, RHO, gamma=0.9, decouple=False, lr=LR, momentum=0.9)
    )
    model = mlp()
    opt = make(model)
    x, y = vector_batch()

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert count_ops(lambda: opt.step(closure)).syncs == syncs


@pytest.mark.parametrize(
    "name, flags, policy",
    [
        ("gsam", {"gsam_alpha": 0.3, "rho_min": 0.01}, "SurrogateGap(alpha=0.3)"),
        ("gsam", {"gsam_alpha": 0.4, "adaptive": True, "rho": 2.0}, "SurrogateGap(alpha=0.4)"),  # the official
        ("friendly-sam", {"fsam_sigma": 0.5, "fsam_lambda": 0.8}, "FriendlyDirection(sigma=0.5, lmbda=0.8)"),
        ("vasso", {"vasso_theta": 0.5}, "EMADirection(theta=0.5)"),
        ("wsam", {"wsam_gamma": 0.8, "wsam_coupled": True}, "WeightedSharpness(gamma=0.8, decouple=False)"),
    ],
)
def test_samopt_train_runs_each_variant_with_its_flags(tmp_path, name, flags, policy):
    from samopt.train import loop
    from tests.test_app import tiny

    built = []
    real = loop.build_optimizer

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    loop.build_optimizer = recording
    try:
        summary = loop.run(tiny(tmp_path, optimizer=name, epochs=1, **flags))
    finally:
        loop.build_optimizer = real
    assert len(built) == 2  # validate() checks the settings over a stand-in model, then the run builds its own
    assert policy in repr(built[-1])
    assert built[-1].param_groups[0]["adaptive"] is flags.get("adaptive", False)
    assert math.isfinite(summary["history"][0]["train_loss"])


def test_bad_variant_flags_are_refused_naming_them(tmp_path):
    from samopt.train import loop
    from tests.test_app import tiny

    for flags, message in [
        ({"fsam_lambda": 1.0}, r"fsam_lambda must be a real number in \[0, 1\), got 1\.0"),
        ({"vasso_theta": 0.0}, r"vasso_theta must be a real number in \(0, 1\], got 0"),
        ({"wsam_gamma": 1.5}, r"wsam_gamma must be a real number in \[0, 1\), got 1\.5"),
        ({"gsam_alpha": -1.0}, r"gsam_alpha must be a finite real number >= 0, got -1\.0"),
        *[
            (
                {"optimizer": name, "adaptive": True},
                rf"adaptive=True scales the perturbation of a two-pass SAM-family "
                rf"optimizer; '{name}' has none",
            )
            for name in ("sgd", "adamw", "msam")
        ],
    ]:
        with pytest.raises(ValueError, match=message):
            loop.validate(tiny(tmp_path, **flags))
