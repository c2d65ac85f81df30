"""Mixed precision: fp16 with a GradScaler (closure and two-phase), bf16 without, non-finite gradients."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, bn_net, buffers, image_batch, mlp, vector_batch, weights

import samopt

OVERFLOW = 1e30  # times the scale, more than fp16 can hold in the backward


def make(scale=2.0**16, growth_interval=2000, in_place=False, check="deferred"):
    model = mlp()
    opt = samopt.SAM(
        model.parameters(), torch.optim.SGD, rho=0.05, perturb_in_place=in_place, check=check, lr=0.1, momentum=0.9
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=growth_interval)
    return model, opt, scaler


def fp16_closure(model, scaler, x, y, overflow_on_call=None, calls=None):
    calls = [] if calls is None else calls

    def closure():
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        factor = OVERFLOW if len(calls) == overflow_on_call else 1.0
        scaler.scale(loss * factor).backward()
        return loss

    return closure


@pytest.mark.parametrize("check", ["deferred", "eager"])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("overflow_pass", [1, 2])
def test_fp16_overflow_in_either_pass_skips_the_update_and_lowers_the_scale(overflow_pass, in_place, check):
    x, y = vector_batch()
    model, opt, scaler = make(in_place=in_place, check=check)
    w0 = weights(model)
    calls = []
    opt.step(fp16_closure(model, scaler, x, y, overflow_on_call=overflow_pass, calls=calls), scaler=scaler)
    scaler.update()
    assert_equal_tensors(weights(model), w0)
    assert scaler.get_scale() == 2.0**15
    # eager: an overflow at w skips the pass at w + e as well; deferred: the host does not know, the pass runs
    assert len(calls) == (overflow_pass if check == "eager" else 2)
    assert opt.state == {} or all("momentum_buffer" not in s for s in opt.state.values())
    # the next, clean iteration updates normally with the lowered scale
    opt.step(fp16_closure(model, scaler, x, y), scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    assert not torch.equal(model[0].weight, w0[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("overflow_pass", [1, 2])
def test_fp16_two_phase_recipe(overflow_pass, in_place):
    x, y = vector_batch()
    model, opt, scaler = make(in_place=in_place)
    w0 = weights(model)
    for p in (1, 2):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * (OVERFLOW if p == overflow_pass else 1.0)).backward()
        if p == 1:
            opt.first_step(zero_grad=True, scaler=scaler)
        else:
            opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert_equal_tensors(weights(model), w0)
    assert scaler.get_scale() == 2.0**15


@pytest.mark.parametrize("api", ["closure", "two-phase"])
def test_loss_scaling_in_fp32_is_exact_and_grows_the_scale_like_gradscaler(api):
    """Scaling by a power of two is exact in fp32, so scaled and unscaled SAM agree bit for bit."""
    x, y = vector_batch()
    model, opt, scaler = make(scale=2.0**10, growth_interval=2)
    ref_model = mlp()
    ref = samopt.SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scales = []
    for _ in range(4):

        def closure():
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        if api == "closure":
            opt.step(closure, scaler=scaler)
        else:
            closure()
            opt.first_step(scaler=scaler)
            closure()
            opt.second_step(scaler=scaler)
        scaler.update()
        scales.append(scaler.get_scale())

        def ref_closure():
            loss = F.cross_entropy(ref_model(x), y)
            loss.backward()
            return loss

        ref.step(ref_closure)
    assert_equal_tensors(weights(model), weights(ref_model))
    assert scales == [2.0**10, 2.0**11, 2.0**11, 2.0**12]  # growth every 2 clean iterations


def test_disabled_scaler_is_no_scaler():
    x, y = vector_batch()
    a, b = mlp(), mlp()
    opt_a = samopt.SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt_b = samopt.SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    off = torch.amp.GradScaler("cpu", enabled=False)
    for model, opt, scaler in ((a, opt_a, off), (b, opt_b, None)):

        def closure(model=model):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure, scaler=scaler)
    assert_equal_tensors(weights(a), weights(b))


def test_bf16_autocast_needs_no_scaler():
    x, y = vector_batch(n=64)
    fp32, bf16 = mlp(), mlp()
    w0 = torch.cat([p.detach().reshape(-1) for p in fp32.parameters()])
    for model, dtype in ((fp32, None), (bf16, torch.bfloat16)):
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

        def closure(model=model, dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    d32 = torch.cat([p.detach().reshape(-1) for p in fp32.parameters()]) - w0
    d16 = torch.cat([p.detach().reshape(-1) for p in bf16.parameters()]) - w0
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.99


def bf16_region(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


@pytest.mark.parametrize("optimizer", ["sam", "sam-in-place", "delta-sam"])
def test_a_step_inside_one_autocast_region_computes_at_w_plus_e(optimizer):
    """autocast keeps its bf16 copy of each weight until the outermost region exits, so steps run inside one
    region (as Lightning < 2.5.5 runs training_step, or around a whole loop) would compute at w + e, at δ-SAM's
    probes and after an update with stale copies unless samopt drops them whenever it moves the weights."""
    x, y = vector_batch(n=16)

    def train(outer: bool) -> list[torch.Tensor]:
        model = mlp()
        if optimizer == "delta-sam":
            opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.5, seed=0, lr=0.1)
        else:
            in_place = optimizer == "sam-in-place"
            opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturb_in_place=in_place, lr=0.1)

        def closure():
            with bf16_region(not outer):
                out = model(x)
            if optimizer == "delta-sam":
                return F.cross_entropy(out.float(), y, reduction="none")
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            return loss

        with bf16_region(outer):  # one region around all three steps, as around a whole training loop
            for _ in range(3):
                opt.step(closure)
        return weights(model)

    assert torch.is_autocast_cache_enabled()
    assert_equal_tensors(train(outer=True), train(outer=False))


@pytest.mark.parametrize("bad_pass, name", [(1, r"clean pass \(at w\)"), (2, r"perturbed pass \(at w \+ e\)")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_gradient_without_scaler_raises_naming_the_pass(bad_pass, name, value):
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, check="eager", lr=0.1)
    w0 = weights(model)
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y) * (value if len(calls) == bad_pass else 1.0)
        loss.backward()
        return loss

    with pytest.raises(samopt.NonFiniteGradientError, match=f"non-finite gradient in the {name}") as e:
        opt.step(closure)
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, FloatingPointError)
    assert_equal_tensors(weights(model), w0)
    opt.state_dict()  # not stuck in the perturbed state


def test_fp16_parameters_cannot_be_unscaled():
    model = mlp(torch.float16)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = vector_batch(dtype=torch.float16)
    scaler.scale(F.cross_entropy(model(x).float(), y)).backward()
    with pytest.raises(ValueError, match=r"Attempting to unscale FP16 gradients"):
        opt.first_step(scaler=scaler)


def test_second_step_needs_the_scaler_of_first_step():
    x, y = vector_batch()
    model, opt, scaler = make()
    w0 = weights(model)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step(scaler=scaler)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match=r"second_step\(\) must get the same scaler as first_step\(\)"):
        opt.second_step()
    assert_equal_tensors(weights(model), w0)


def test_scaler_must_be_a_gradscaler():
    model, opt, _ = make()
    x, y = vector_batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(TypeError, match=r"scaler must be a torch.amp.GradScaler or None, got int"):
        opt.first_step(scaler=3)


@pytest.mark.parametrize("optimizer", ["sam", "delta"])
def test_deferred_check_skips_on_the_device_and_raises_at_the_next_step_naming_the_bad_one(optimizer):
    """A non-finite gradient without a scaler, after the base optimizer's first step: the step returns, its update
    is skipped on the device (weights and momentum as before it), and the next step raises, naming it."""
    x, y = vector_batch()
    model, ref = mlp(), mlp()
    kw = {"rho": 0.05, "lr": 0.1, "momentum": 0.9}
    make = (
        (lambda ps: samopt.SAM(ps, torch.optim.SGD, **kw))
        if optimizer == "sam"
        else (lambda ps: samopt.DeltaSAM(ps, torch.optim.SGD, estimator="logit", **kw))
    )
    opt, ref_opt = make(model.parameters()), make(ref.parameters())
    assert opt.check == "deferred" and opt.base_optimizer.defaults["fused"] is True

    def closure(m, bad=False):
        def run():
            logits = m(x)
            losses = F.cross_entropy(logits, y, reduction="none") * (float("nan") if bad else 1.0)
            if optimizer == "delta":
                return losses, logits
            loss = losses.mean()
            loss.backward()
            return loss

        return run

    opt.step(closure(model))
    ref_opt.step(closure(ref))
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.step(closure(model, bad=True))  # step 2: no error yet, and no update
    assert_equal_tensors(weights(model), weights(ref))
    assert_equal_tensors([opt.state[p]["momentum_buffer"] for p in model.parameters()], momentum)
    with pytest.raises(
        samopt.NonFiniteGradientError, match=r"non-finite gradient in step 2 \(without a GradScaler\)"
    ) as e:
        opt.step(closure(model))
    assert e.value.step == 2 and isinstance(e.value, FloatingPointError)
    assert_equal_tensors(weights(model), weights(ref))  # raised before the step ran
    opt.step(closure(model))  # reported once: training may go on
    ref_opt.step(closure(ref))
    assert_equal_tensors(weights(model), weights(ref))


def test_check_finite_raises_at_once_and_the_first_step_is_checked_on_the_host():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    w0 = weights(model)

    def closure(bad):
        def run():
            loss = F.cross_entropy(model(x), y) * (float("nan") if bad else 1.0)
            loss.backward()
            return loss

        return run

    # before the base optimizer has stepped once (fused SGD would skip its first step into garbage momentum)
    with pytest.raises(samopt.NonFiniteGradientError, match=r"non-finite gradient in the perturbed pass"):
        opt.step(closure(True))
    assert_equal_tensors(weights(model), w0)
    assert not opt.state
    opt.check_finite()  # nothing pending
    opt.step(closure(False))
    w1 = weights(model)
    opt.step(closure(True))
    with pytest.raises(samopt.NonFiniteGradientError, match="in step 3"):
        opt.check_finite()
    opt.check_finite()
    assert_equal_tensors(weights(model), w1)


def test_check_mode_is_validated():
    with pytest.raises(ValueError, match="check must be one of 'deferred', 'eager'; got 'lazy'"):
        samopt.SAM(mlp().parameters(), torch.optim.SGD, check="lazy", lr=0.1)


@pytest.mark.parametrize("bn", ["first", "both"])
def test_a_step_skipped_on_the_device_keeps_the_batchnorm_statistics(bn):
    """bn="both" keeps the perturbed pass's running statistics, but not those of a step whose update is skipped
    on the device (its perturbed pass ran at a non-finite w + e)."""
    model, ref = bn_net(), bn_net()
    x, y = image_batch()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, bn=bn, lr=0.1, momentum=0.9)
    ref_opt = samopt.SAM(ref.parameters(), torch.optim.SGD, rho=0.05, bn=bn, lr=0.1, momentum=0.9)

    def closure(m, factor=1.0):
        def run():
            loss = F.cross_entropy(m(x), y) * factor
            loss.backward()
            return loss

        return run

    for factor in (1.0, 1.0, float("nan")):  # the first step is checked on the host; the third skips on the device
        opt.step(closure(model, factor))
    for _ in range(2):
        ref_opt.step(closure(ref))
    with torch.no_grad():
        ref(x)  # the skipped step's clean pass, whose statistics stay, as in any training step
    assert_equal_tensors(weights(model), weights(ref))
    assert_equal_tensors(buffers(model), buffers(ref))
    with pytest.raises(samopt.NonFiniteGradientError, match="in step 3"):
        opt.check_finite()
