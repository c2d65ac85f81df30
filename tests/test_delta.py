"""δ-SAM (per-example reweighting of the ascent) and the per-instance / m-sharpness SAM reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, bn_net, image_batch, mlp, reloaded, vector_batch, weights
from torch import nn

import samopt
from samopt.delta import _RNG, delta_weights


def per_example(model, x, y):
    return lambda: F.cross_entropy(model(x), y, reduction="none")


def with_logits(model, x, y):
    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y, reduction="none"), logits

    return closure


def exact_norms(model, x, y):
    """||grad l_i|| by a loop of autograd.grad calls, one example at a time."""
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, list(model.parameters()))
        out.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs)))
    return torch.tensor(out, dtype=torch.float64)


def hand_weights(s, alpha, clip, kappa_rel=1e-3):
    kappa = kappa_rel * float(s.median())
    lam = (s + kappa) ** (-alpha)
    lam = lam / lam.sum()
    if clip is not None:  # fix the weights above the cap at it, share the rest in proportion, repeat
        cap, fixed = clip / len(s), torch.zeros_like(lam, dtype=torch.bool)
        while bool((lam > cap + 1e-15).any()):
            fixed |= lam > cap
            rest = lam.masked_fill(fixed, 0.0)
            lam = torch.where(fixed, torch.full_like(lam, cap), rest / rest.sum() * (1 - cap * int(fixed.sum())))
    return lam


def test_delta_weights_by_hand():
    s = torch.tensor([0.5, 1.0, 2.0, 4.0])
    torch.testing.assert_close(delta_weights(s, 1.0, clip=None, kappa_rel=0.0), torch.tensor([8.0, 4, 2, 1]) / 15)
    torch.testing.assert_close(delta_weights(s, -1.0, clip=None, kappa_rel=0.0), s / s.sum())
    torch.testing.assert_close(delta_weights(s, 0.0), torch.full((4,), 0.25))
    # clip 1.2 (cap 0.3): [8, 4, 2, 1] / 15 -> [0.3, 0.4, 0.2, 0.1] -> [0.3, 0.3, 0.8 / 3, 0.4 / 3]
    torch.testing.assert_close(
        delta_weights(s, 1.0, clip=1.2, kappa_rel=0.0), torch.tensor([0.3, 0.3, 0.8 / 3, 0.4 / 3])
    )
    torch.testing.assert_close(delta_weights(s, 1.0, clip=1.0), torch.full((4,), 0.25))  # cap 1/n: uniform
    # kappa = 1e-3 * median (torch takes the lower middle value, 1.0)
    expected = torch.tensor([1 / 0.501, 1 / 1.001, 1 / 2.001, 1 / 4.001], dtype=torch.float64)
    torch.testing.assert_close(delta_weights(s, 1.0, clip=None), (expected / expected.sum()).float())


@pytest.mark.parametrize("clip", [1.0, 1.5, 2.0, 5.0])
def test_the_closed_form_cap_equals_capping_one_round_at_a_time(clip):
    """delta_weights caps without a loop (no read-back); the iterative rule (hand_weights) is its definition."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 32, 128):
        for alpha in (-1.0, 1.0, 3.0):
            s = torch.rand(n, generator=g, dtype=torch.float64) ** 4 * 10
            s[: n // 4] = s[0]  # ties
            expected = hand_weights(s, alpha, clip).float()
            torch.testing.assert_close(delta_weights(s, alpha, clip=clip), expected, rtol=1e-5, atol=1e-7)
            assert float(delta_weights(s, alpha, clip=clip).max()) <= clip / n * (1 + 1e-6)


def test_delta_weights_stay_finite_for_zero_scores():
    zeros = torch.zeros(4)
    for alpha in (2.0, 1.0, -1.0):
        torch.testing.assert_close(delta_weights(zeros, alpha), torch.full((4,), 0.25))
    lam = delta_weights(torch.tensor([0.0, 0.0, 0.0, 1.0]), 2.0, clip=None)  # kappa = 0: zeros dominate
    torch.testing.assert_close(lam, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


@pytest.mark.parametrize("estimator", ["probe", "logit", "exact"])
def test_alpha_zero_is_sam_bit_for_bit(estimator):
    x, y = image_batch(n=8)
    results = []
    for delta in (False, True):
        model = bn_net()
        kw = {"rho": 0.05, "lr": 0.1, "momentum": 0.9}
        if delta:
            opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, estimator=estimator, alpha=0.0, **kw)
        else:
            opt = samopt.SAM(model.parameters(), torch.optim.SGD, **kw)
        for _ in range(3):
            if delta:
                opt.step(with_logits(model, x, y))
            else:

                def closure(model=model):
                    loss = F.cross_entropy(model(x), y, reduction="none").mean()
                    loss.backward()
                    return loss

                opt.step(closure)
        results.append(weights(model) + [b.clone() for b in model.buffers()])
    assert_equal_tensors(*results)


@pytest.mark.parametrize(
    ("alpha", "clip", "reweight_descent"), [(1.0, 5.0, False), (0.5, None, True), (-1.0, 2.0, False)]
)
def test_exact_estimator_step_equals_a_hand_computed_reweighted_sam(alpha, clip, reweight_descent):
    x, y = vector_batch(n=8)
    model, ref = mlp(), mlp()
    opt = samopt.DeltaSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        estimator="exact",
        alpha=alpha,
        clip=clip,
        lr=0.5,
        reweight_descent=reweight_descent,
    )
    opt.step(per_example(model, x, y))

    s = exact_norms(ref, x, y)
    lam = hand_weights(s, alpha, clip)
    torch.testing.assert_close(opt.last_scores.double(), s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(opt.last_weights.double(), lam, rtol=1e-5, atol=1e-7)
    params = list(ref.parameters())
    weighted = (lam.float() * F.cross_entropy(ref(x), y, reduction="none")).sum()
    g = torch.autograd.grad(weighted, params)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
    with torch.no_grad():
        for p, gi in zip(params, g, strict=True):
            p.add_(gi, alpha=0.1 / norm)
    at_e = F.cross_entropy(ref(x), y, reduction="none")
    descent = torch.autograd.grad((lam.float() * at_e).sum() if reweight_descent else at_e.mean(), params)
    with torch.no_grad():
        for p, gi, d in zip(params, g, descent, strict=True):
            p.sub_(gi, alpha=0.1 / norm)
            p.sub_(d, alpha=0.5)
    for a, b in zip(weights(model), weights(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logit_estimator_is_the_analytic_logit_gradient_norm():
    x, y = vector_batch(n=8)
    model = mlp()
    with torch.no_grad():
        z = model(x)
    expected = (z.softmax(-1) - F.one_hot(y, 3).float()).norm(dim=1)
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, estimator="logit", lr=0.1)
    opt.step(with_logits(model, x, y))
    torch.testing.assert_close(opt.last_scores, expected, rtol=1e-6, atol=1e-7)


def test_logit_estimator_takes_the_logits_of_each_chunk_of_the_batch():
    """Losses from several forwards (micro-batches) come with the list of their logits; the concatenated logits
    are not in the losses' graph, and are refused with an error that says what to return."""
    x, y = vector_batch(n=8)
    model = mlp()
    with torch.no_grad():
        z = model(x)
    expected = (z.softmax(-1) - F.one_hot(y, 3).float()).norm(dim=1)

    def chunked(concatenate=False):
        parts = [(F.cross_entropy(z := model(x[i : i + 3]), y[i : i + 3], reduction="none"), z) for i in (0, 3, 6)]
        logits = [p[1] for p in parts]
        return torch.cat([p[0] for p in parts]), torch.cat(logits) if concatenate else logits

    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, estimator="logit", lr=0.1)
    w = weights(model)
    with pytest.raises(ValueError, match=r"the list of their logits, not their concatenation"):
        opt.step(lambda: chunked(concatenate=True))
    assert_equal_tensors(weights(model), w)
    opt.step(chunked)
    torch.testing.assert_close(opt.last_scores, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"or a list of the logits of consecutive chunks of the batch"):
        opt.step(lambda: (chunked()[0], chunked()[1][:2]))  # logits of 6 examples for 8 losses


def spearman(a, b):
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_probe_estimates_correlate_with_exact_norms():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 5, generator=g) * torch.linspace(0.2, 3.0, 32)[:, None]  # spread the norms
    y = torch.randint(0, 3, (32,), generator=g)
    model = mlp()
    opt = samopt.DeltaSAM(
        model.parameters(), torch.optim.SGD, rho=0.05, estimator="probe", num_probes=64, seed=0, lr=0.0
    )
    opt.step(per_example(model, x, y))
    rho_s = spearman(opt.last_scores.double(), exact_norms(model, x, y))
    assert rho_s > 0.5, rho_s


def test_probes_leave_weights_buffers_gradients_and_rng_and_replay_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = vector_batch(n=8)
    # sigma far below the weights' resolution: w + sigma z == w, so the probe losses equal the
    # clean ones exactly if and only if the probes see the clean pass's dropout masks
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1e-30, num_probes=2, lr=0.1)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    grads, w, bufs = [p.grad.clone() for p in params], weights(model), [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    probes = opt._probe_losses(per_example(model, x, y), _RNG.of(params))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_equal_tensors(weights(model), w)
    assert_equal_tensors([p.grad for p in params], grads)
    assert_equal_tensors([b.clone() for b in model.buffers()], bufs)
    clean = F.cross_entropy(model(x), y, reduction="none")  # the clean pass: same dropout masks
    assert len(probes) == 2 and all(torch.equal(p, clean.detach()) for p in probes)


@pytest.mark.parametrize("estimator", ["probe", "logit", "exact"])
def test_in_place_perturbation_and_masks_work_with_every_estimator(estimator):
    x, y = image_batch(n=8)
    results = []
    for in_place in (False, True):
        model = bn_net()
        mask = samopt.masks.RandomMask(0.5, seed=0)
        opt = samopt.DeltaSAM(
            model.parameters(),
            torch.optim.SGD,
            rho=0.05,
            estimator=estimator,
            seed=0,
            mask=mask,
            perturb_in_place=in_place,
            lr=0.1,
        )
        for _ in range(2):
            opt.step(with_logits(model, x, y))
        results.append(weights(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_bit_exact_with_probes():
    def fresh():
        model = bn_net()
        return model, samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, seed=1, lr=0.1, momentum=0.9)

    def train(model, opt, start):
        for t in range(start, start + 3):
            x, y = image_batch(seed=t, n=8)
            opt.step(per_example(model, x, y))

    model, opt = fresh()
    train(model, opt, 0)
    train(model, opt, 3)
    straight = weights(model)
    model, opt = fresh()
    train(model, opt, 0)
    model, opt = reloaded(model, opt, fresh)
    train(model, opt, 3)
    assert_equal_tensors(weights(model), straight)


def test_bad_input_names_the_argument():
    model = mlp()
    x, y = vector_batch()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1, got 0"):
        samopt.DeltaSAM(params, num_probes=0)
    with pytest.raises(ValueError, match="alpha must be a finite real number"):
        samopt.DeltaSAM(params, alpha=float("nan"))
    with pytest.raises(ValueError, match="estimator must be one of 'probe', 'logit', 'exact'; got 'grad'"):
        samopt.DeltaSAM(params, estimator="grad")
    with pytest.raises(ValueError, match="clip must be None or a real number >= 1"):
        samopt.DeltaSAM(params, clip=0.5)
    opt = samopt.DeltaSAM(params, lr=0.1)
    assert (opt.estimator, opt.alpha, opt.clip, opt.num_probes) == ("probe", -1.0, 5.0, 3)  # the measured defaults
    with pytest.raises(ValueError, match=r"per-example losses, a 1-D tensor of shape \(batch,\).*got shape \(\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=r"got shape \(8, 1\)"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none")[:, None])
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    logit = samopt.DeltaSAM(params, estimator="logit", lr=0.1)
    with pytest.raises(ValueError, match=r'estimator="logit" needs the closure to return \(losses, logits\)'):
        logit.step(per_example(model, x, y))
    w = weights(model)
    calls = []

    def shrinking():
        calls.append(1)
        losses = F.cross_entropy(model(x), y, reduction="none")
        return losses if len(calls) == 1 else losses[:4]

    with pytest.raises(ValueError, match=r"returned \(8,\) losses in a probe pass, \(4,\) at w"):
        opt.step(shrinking)
    assert_equal_tensors(weights(model), w)


# ------------------------------------------------------------- per-instance


def test_per_instance_sam_equals_a_hand_computed_average_of_per_example_sam_gradients():
    x, y = vector_batch(n=6)
    model, ref = mlp(), mlp()
    opt = samopt.PerInstanceSAM(model.parameters(), torch.optim.SGD, rho=0.1, m=2, lr=0.5)
    opt.step(
        lambda idx: F.cross_entropy(model(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none")
    )
    params = list(ref.parameters())
    total = [torch.zeros_like(p) for p in params]
    for start in (0, 2, 4):
        xb, yb = x[start : start + 2], y[start : start + 2]
        g = torch.autograd.grad(F.cross_entropy(ref(xb), yb), params)
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
        with torch.no_grad():
            for p, gi in zip(params, g, strict=True):
                p.add_(gi, alpha=0.1 / norm)
        d = torch.autograd.grad(F.cross_entropy(ref(xb), yb), params)
        with torch.no_grad():
            for p, gi, t, di in zip(params, g, total, d, strict=True):
                p.sub_(gi, alpha=0.1 / norm)
                t.add_(di, alpha=2 / 6)
    for p, d in zip(model.parameters(), total, strict=True):
        torch.testing.assert_close(p.grad, d, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for p, d in zip(params, total, strict=True):
            p.sub_(d, alpha=0.5)
    for a, b in zip(weights(model), weights(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_instance_sam_with_one_micro_batch_is_sam():
    x, y = vector_batch(n=8)
    a, b = mlp(), mlp()
    pi = samopt.PerInstanceSAM(a.parameters(), torch.optim.SGD, rho=0.1, m=8, lr=0.5, momentum=0.9)
    sam = samopt.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, momentum=0.9)
    for _ in range(3):
        pi.step(
            lambda idx: F.cross_entropy(a(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none")
        )

        def closure():
            loss = F.cross_entropy(b(x), y, reduction="none").mean()
            loss.backward()
            return loss

        sam.step(closure)
    assert_equal_tensors(weights(a), weights(b))


def test_per_instance_sam_keeps_batchnorm_to_the_one_full_batch_pass():
    model = bn_net()
    x, y = image_batch(n=8)
    ref = bn_net()
    ref(x)  # one training-mode pass over the whole batch
    opt = samopt.PerInstanceSAM(model.parameters(), torch.optim.SGD, rho=0.1, m=4, lr=0.1)
    opt.step(
        lambda idx: F.cross_entropy(model(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none")
    )
    assert_equal_tensors([b.clone() for b in model.buffers()], [b.clone() for b in ref.buffers()])
    both = bn_net()
    ref_both = bn_net()
    ref_both(x)
    opt = samopt.PerInstanceSAM(both.parameters(), torch.optim.SGD, rho=0.1, m=4, bn="both", lr=0.1)
    opt.step(
        lambda idx: F.cross_entropy(both(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none")
    )
    assert_equal_tensors([b.clone() for b in both.buffers()], [b.clone() for b in ref_both.buffers()])
    with pytest.raises(ValueError, match="m must be an integer >= 1, got 0"):
        samopt.PerInstanceSAM(model.parameters(), m=0)


@pytest.mark.parametrize("overflow_pass", [1, 2])
def test_fp16_overflow_in_either_pass_skips_the_update_like_sam(overflow_pass):
    x, y = vector_batch()
    model = mlp()
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, estimator="logit", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    calls = []

    def closure():
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        return (losses * (1e30 if len(calls) == overflow_pass else 1.0)), logits

    w = weights(model)
    opt.step(closure, scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    assert_equal_tensors(weights(model), w)
    if overflow_pass == 1:  # the overflowing estimate fell back to the plain mean loss for that step
        torch.testing.assert_close(opt.last_weights, torch.full((len(y),), 1 / len(y)))


def test_a_non_finite_estimate_without_a_scaler_raises_and_leaves_the_weights():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, estimator="logit", check="eager", lr=0.1)
    w = weights(model)

    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y, reduction="none") * float("inf"), logits

    with pytest.raises(RuntimeError, match="non-finite per-example norm estimate from estimator='logit'"):
        opt.step(closure)
    assert_equal_tensors(weights(model), w)


def test_max_grad_norm_clips_the_descent_gradient():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, estimator="exact", max_grad_norm=1e-3, lr=1.0)
    w = weights(model)
    opt.step(per_example(model, x, y))
    step = math.sqrt(sum(float(((a - b).double() ** 2).sum()) for a, b in zip(weights(model), w, strict=True)))
    assert step == pytest.approx(1e-3, rel=1e-3)


def test_the_two_phase_api_is_refused_because_it_would_be_plain_sam():
    model = mlp()
    x, y = vector_batch()
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(TypeError, match=r"DeltaSAM builds its ascent gradient from per-example losses, which only "
                       r"step\(closure\) computes"):  # fmt: skip
        opt.first_step()
    w = weights(model)
    with (  # the context-manager form of the same two phases
        pytest.raises(TypeError, match=r"DeltaSAM builds its ascent gradient from per-example losses"),
        opt.perturbed(),
    ):
        pass
    assert all(torch.equal(a, b) for a, b in zip(weights(model), w, strict=True))  # nothing moved or stepped
    assert opt.per_example and not samopt.SAM(model.parameters(), lr=0.1).per_example
