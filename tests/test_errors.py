"""Bad input raises a clear error naming the argument and the allowed values; clipping is exact."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, mlp, vector_batch, weights

import samopt


def sam(**kw):
    return samopt.SAM(mlp().parameters(), **{"base_optimizer": torch.optim.SGD, "lr": 0.1, **kw})


@pytest.mark.parametrize(
    "kw, exc, message",
    [
        ({"rho": -0.1}, ValueError, "rho must be a finite real number >= 0, got -0.1"),
        ({"rho": float("nan")}, ValueError, "rho must be a finite real number >= 0, got nan"),
        ({"rho": float("inf")}, ValueError, "rho must be a finite real number >= 0, got inf"),
        ({"rho": "0.05"}, TypeError, r"rho must be a finite real number >= 0, got '0.05' \(str\)"),
        ({"rho": True}, TypeError, r"rho must be a finite real number >= 0, got True \(bool\)"),
        ({"eta": -1.0}, ValueError, "eta must be a finite real number >= 0, got -1.0"),
        ({"eta": float("inf")}, ValueError, "eta must be a finite real number >= 0, got inf"),
        ({"adaptive": 1}, TypeError, r"adaptive must be True or False, got 1 \(int\)"),
        ({"bn": "second"}, ValueError, "bn must be one of 'first', 'both'; got 'second'"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be None or a finite real number > 0, got 0.0"),
        ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm must be None or a finite real number > 0"),
    ],
)
def test_bad_constructor_arguments(kw, exc, message):
    with pytest.raises(exc, match=message):
        sam(**kw)


def test_bad_param_group_values_name_the_group():
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": -2}]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['rho'\] must be a finite real number >= 0, got -2"):
        samopt.SAM(groups, torch.optim.SGD, lr=0.1)
    groups = [{"params": model.parameters(), "adaptive": "yes"}]
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['adaptive'\] must be True or False"):
        samopt.SAM(groups, torch.optim.SGD, lr=0.1)


def test_values_changed_after_construction_are_checked_at_the_next_step():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["rho"] = float("nan")  # e.g. a broken rho schedule
    F.cross_entropy(model(x), y).backward()
    w0 = weights(model)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['rho'\] must be a finite real number >= 0, got nan"):
        opt.first_step()
    assert_equal_tensors(weights(model), w0)


@pytest.mark.parametrize(
    "base, message",
    [
        (torch.optim.SGD(mlp().parameters(), lr=0.1), "base_optimizer must be a torch.optim.Optimizer subclass"),
        ("sgd", "base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD"),
        (torch.nn.Linear, "base_optimizer must be a torch.optim.Optimizer subclass"),
        (samopt.SAM, r"base_optimizer must be a plain optimizer, not a samopt optimizer \(SAM\)"),
        (torch.optim.Adadelta, r"base_optimizer Adadelta has its own \['rho'\] hyperparameter"),
    ],
)
def test_base_optimizer_must_be_a_plain_optimizer_class(base, message):
    with pytest.raises(TypeError, match=message):
        samopt.SAM(mlp().parameters(), base, lr=0.1)


def test_step_without_closure():
    opt = sam()
    with pytest.raises(ValueError, match=r"SAM.step\(\) needs a closure .* or use opt.first_step\(\)"):
        opt.step()
    with pytest.raises(TypeError, match=r"closure must be callable, got int"):
        opt.step(3)


def test_closure_returning_no_loss():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = vector_batch()
    w0 = weights(model)

    def closure():
        F.cross_entropy(model(x), y).backward()

    with pytest.raises(TypeError, match=r"the closure returned None: it must .* return the loss"):
        opt.step(closure)
    assert_equal_tensors(weights(model), w0)


def test_closure_without_backward():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = vector_batch()
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient in the clean pass .* loss.backward\(\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))


def test_phase_order_errors():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = vector_batch()
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without a preceding first_step\(\)"):
        opt.second_step()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=False)
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice without second_step\(\)"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"step\(\) called between first_step\(\) and second_step\(\)"):
        opt.step(lambda: 0.0)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient in the perturbed pass"):
        opt.second_step()


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = samopt.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"param_groups\[0\] has a sparse gradient; SAM needs dense gradients"):
        opt.first_step()


def test_max_grad_norm_clips_the_descent_gradient_like_clip_grad_norm():
    x, y = vector_batch()
    model, ref_model = mlp(), mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, max_grad_norm=0.1, lr=0.5)
    # the reference: plain samopt without clipping, clipping the w + e gradients with torch in between
    ref = samopt.SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5)
    for _ in range(3):
        # start both from the same weights: the two total norms may differ in the last bit
        # (different summation order), and that drift would compound over the steps
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
                q.copy_(p)
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        F.cross_entropy(model(x), y).backward()
        descent = [p.grad.clone() for p in model.parameters()]
        opt.second_step()

        F.cross_entropy(ref_model(x), y).backward()
        ref.first_step()
        F.cross_entropy(ref_model(x), y).backward()
        total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
        assert total > 0.1  # clipping is active in this test
        for d, p in zip(descent, ref_model.parameters(), strict=True):  # opt saw the same unclipped gradient
            torch.testing.assert_close(d * (0.1 / (total + 1e-6)), p.grad, rtol=1e-6, atol=0)
        ref.second_step()
    for a, b in zip(weights(model), weights(ref_model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_failure_while_perturbing_leaves_the_weights_at_w(monkeypatch):
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM([{"params": model[0].parameters()}, {"params": model[2].parameters()}], torch.optim.SGD, lr=0.1)
    real = samopt.functional.perturb_
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second group: the first one has already moved
            raise MemoryError("out of memory")
        real(*args, **kwargs)

    monkeypatch.setattr(samopt.functional, "perturb_", failing)
    F.cross_entropy(model(x), y).backward()
    w0 = weights(model)
    with pytest.raises(MemoryError):
        opt.first_step()
    assert_equal_tensors(weights(model), w0)
    opt.state_dict()  # not left in the perturbed state


# ------------------------------------------------------------------ parameters SAM cannot move and back


def test_a_parameter_listed_twice_is_refused():
    model = mlp()
    w = model[0].weight
    # torch only warns about this; in samopt's storage-swap mode the weights would never return to w
    with pytest.raises(
        ValueError, match=r"param_groups\[0\] lists a parameter \(shape \(7, 5\)\) twice, at positions 0 and 4"
    ):
        samopt.SAM([*model.parameters(), w], torch.optim.SGD, lr=0.1)
    with pytest.raises(
        ValueError, match=r"param_groups\[1\] and param_groups\[0\] both hold a parameter \(shape \(7, 5\)\)"
    ):
        samopt.SAM([{"params": model.parameters()}, {"params": [w]}], torch.optim.SGD, lr=0.1)
    opt = samopt.SAM(model[2].parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(
        ValueError, match=r"param_groups\[1\] and param_groups\[0\] both hold a parameter \(shape \(3, 7\)\)"
    ):
        opt.add_param_group({"params": [model[2].weight]})
    with pytest.raises(ValueError, match=r"param_groups\[1\] lists a parameter \(shape \(7,\)\) twice"):
        opt.add_param_group({"params": [model[0].bias, model[0].bias]})
    assert len(opt.param_groups) == 1  # nothing was added


def test_meta_device_parameters_are_refused():
    meta = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match=r"param_groups\[0\] parameter 0 \(shape \(2, 3\)\) is on the meta device"):
        samopt.SAM(meta.parameters(), torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize(
    "lr, message",
    [
        (float("nan"), r"param_groups\[0\]\['lr'\] must be a finite real number >= 0, got nan"),
        (float("inf"), r"param_groups\[0\]\['lr'\] must be a finite real number >= 0, got inf"),
        (
            1e308,
            r"param_groups\[0\]\['lr'\] must be at most 3.403e\+38 \(the largest torch.float32 of its parameters\)",
        ),
        (torch.tensor(float("nan")), r"param_groups\[0\]\['lr'\] must be a finite real number >= 0, got nan"),
    ],
)
def test_a_learning_rate_the_weights_cannot_take_is_refused(lr, message):
    with pytest.raises(ValueError, match=message):
        sam(lr=lr)


def test_a_learning_rate_set_later_is_checked_at_the_next_step():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1, weight_decay=1e-4)
    w0 = weights(model)
    for key, value in (("lr", float("nan")), ("lr", -0.1), ("weight_decay", 1e39)):
        opt.param_groups[0][key] = value  # e.g. a broken schedule
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\] must be"):
            opt.first_step()
        assert_equal_tensors(weights(model), w0)  # no NaN reached the weights
        opt.param_groups[0].update(lr=0.1, weight_decay=1e-4)
        opt.zero_grad()


def test_complex_parameters_work_with_sam_and_are_refused_by_asam():
    """SAM on a complex parameter is SAM on its real and imaginary parts (torch's complex gradient convention)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.cfloat, generator=g)
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.cfloat, generator=g))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())

    def closure(weight):
        def run():
            w = weight()  # read at each call: the parameter's data moves to w + e and back
            loss = (x @ w).abs().pow(2).mean() + (x @ w).real.sum()
            loss.backward()
            return loss

        return run

    complex_opt = samopt.SAM([z], torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9)
    real_opt = samopt.SAM([r], torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9)
    for _ in range(3):
        complex_opt.step(closure(lambda: z))
        real_opt.step(closure(lambda: torch.view_as_complex(r)))
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"param_groups\[0\] holds complex parameters, which ASAM \(adaptive=True\)"):
        samopt.SAM([z], torch.optim.SGD, adaptive=True, lr=0.1)
    lin = torch.nn.Linear(2, 2)
    groups = [{"params": lin.parameters(), "adaptive": True}, {"params": [z]}]
    samopt.SAM(groups, torch.optim.SGD, lr=0.1)  # ASAM for the real group, SAM for the complex one
