"""state_dict, bit-exact resume, param groups shared with the base optimizer, LR schedulers."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, bn_net, buffers, image_batch, mlp, vector_batch, weights

import samopt

BASES = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
}


def build(base, kw, adaptive=False, in_place=False):
    model = bn_net()
    rho = 0.5 if adaptive else 0.05
    opt = samopt.SAM(model.parameters(), base, rho=rho, adaptive=adaptive, perturb_in_place=in_place, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return model, opt, sched


def train(model, opt, sched, steps, start):
    for i in range(start, start + steps):
        x, y = image_batch(seed=i)

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        sched.step()


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", BASES)
def test_resume_is_bit_exact(base, adaptive, in_place):
    cls, kw = BASES[base]
    model, opt, sched = build(cls, kw, adaptive, in_place)
    train(model, opt, sched, 6, 0)

    model2, opt2, sched2 = build(cls, kw, adaptive, in_place)
    train(model2, opt2, sched2, 3, 0)
    blob = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)

    model3, opt3, sched3 = build(cls, kw, adaptive, in_place)  # a fresh process would build exactly this
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    train(model3, opt3, sched3, 3, 3)

    assert_equal_tensors(weights(model3), weights(model))
    assert_equal_tensors(buffers(model3), buffers(model))
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


NO_EXTRA = {"extra_passes": 0.0, "extra_forwards": 0.0}


def test_state_dict_holds_the_base_optimizer_state():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-3)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    sd = opt.state_dict()
    assert sd["samopt"] == {
        "format": 2,
        "kind": "SAM",
        "base": "torch.optim.adamw.AdamW",
        "groups": [{"rho": 0.1, "adaptive": False, "eta": 0.01}],  # SAM's keys, kept out of the base's groups
        "updates": 1,
        "work": {"steps": 1, "ascents": 1, "clean_passes": 1.0, "perturbed_passes": 1.0, **NO_EXTRA},  # one update
        "ascent": {},
        "descent": {},
        "schedule": {},
    }
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["param_groups"][0]["lr"] == 1e-3 and not {"rho", "adaptive", "eta"} & set(sd["param_groups"][0])
    plain = torch.optim.AdamW(mlp().parameters(), lr=1e-3)
    plain.load_state_dict(sd)  # the base optimizer's state, in its own format: a plain AdamW reads it as its own
    assert not {"rho", "adaptive", "eta"} & set(plain.param_groups[0])
    assert opt.state is opt.base_optimizer.state
    fresh = samopt.SAM(mlp().parameters(), torch.optim.AdamW, rho=0.1, lr=1e-3)
    fresh.load_state_dict(sd)
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    assert fresh.state is fresh.base_optimizer.state
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"], sd["state"][0]["exp_avg"])


def test_load_state_dict_rejects_foreign_and_corrupt_dicts():
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    plain = torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match=r"not a samopt state_dict.*opt.base_optimizer.load_state_dict"):
        opt.load_state_dict(plain)
    sd = opt.state_dict()
    sd["samopt"] = {"format": 99}
    with pytest.raises(ValueError, match=r"unsupported samopt state_dict format.*reads format 1"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["samopt"]["groups"][0]["rho"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['rho'\] must be a finite real number >= 0"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    del sd["samopt"]["groups"][0]["adaptive"]
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no 'adaptive'"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["param_groups"][0]["rho"] = 0.3
    with pytest.raises(ValueError, match=r"param_groups\[0\] of the state_dict holds \['rho'\], which format 2 keeps"):
        opt.load_state_dict(sd)


def _stepped(opt, model, steps=2):
    x, y = vector_batch()
    for _ in range(steps):
        if isinstance(opt, samopt.DeltaSAM):  # per-example losses, no backward
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
        else:
            opt.step(lambda: F.cross_entropy(model(x), y).backward() or torch.zeros(()))
    return opt


def as_format1(state):
    """``state`` as samopt wrote it before the seams: SAM's keys in the groups, a mask's state under "mask"."""
    meta = state["samopt"]
    groups = [{**g, **k} for g, k in zip(state["param_groups"], meta["groups"], strict=True)]
    old = {"format": 1, **({"mask": meta["ascent"]} if meta["ascent"] else {})}
    return {**state, "param_groups": groups, "samopt": old}


def _same_state(a, b):
    assert a.keys() == b.keys() and a["param_groups"] == b["param_groups"] and a["samopt"] == b["samopt"]
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for n in a["state"][k])


@pytest.mark.parametrize(
    "make_source, message",
    [
        (
            lambda m: samopt.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9),
            r"the state_dict is of a SAM over torch.optim.sgd.SGD, this one is over torch.optim.adamw.AdamW",
        ),
        (
            lambda m: samopt.DeltaSAM(m.parameters(), torch.optim.AdamW, lr=1e-3),
            r"the state_dict is a DeltaSAM's and this optimizer a SAM: load it into a DeltaSAM",
        ),
        (
            lambda m: samopt.SAM(
                [{"params": [m[0].weight]}, {"params": [m[0].bias, m[2].weight, m[2].bias]}], torch.optim.AdamW, lr=1e-3
            ),
            r"the state_dict has 2 parameter group\(s\), this optimizer 1",
        ),
    ],
)
def test_load_state_dict_refuses_another_optimizers_state_before_changing_anything(make_source, message):
    source_model = mlp()
    source = _stepped(make_source(source_model), source_model)
    model = mlp()
    opt = _stepped(samopt.SAM(model.parameters(), torch.optim.AdamW, lr=1e-3), model)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(source.state_dict())
    _same_state(opt.state_dict(), before)


def test_load_state_dict_refuses_state_of_other_shapes_and_older_states_are_still_checked():
    model = mlp()
    opt = _stepped(samopt.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), model)
    before = opt.state_dict()
    # another model with the same number of tensors, of other shapes
    other = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    theirs = _stepped(samopt.SAM(other.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), other).state_dict()
    with pytest.raises(
        ValueError,
        match=r"the state 'momentum_buffer' of param_groups\[0\] parameter 0 has shape "
        r"\(4, 5\), the parameter \(7, 5\): it was saved from another model",
    ):
        opt.load_state_dict(theirs)
    _same_state(opt.state_dict(), before)
    # a state written before samopt recorded the kind and base: a DeltaSAM's is recognised by its generator,
    # an SGD one by its missing AdamW hyperparameters
    sgd_model = mlp()
    old = as_format1(_stepped(samopt.SAM(sgd_model.parameters(), torch.optim.SGD, lr=0.1), sgd_model).state_dict())
    adamw = samopt.SAM(mlp().parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\] of the state_dict has no \['betas', 'eps'\], which "
        r"AdamW needs: it was saved by another kind of optimizer",
    ):
        adamw.load_state_dict(old)
    delta = samopt.DeltaSAM(mlp().parameters(), torch.optim.SGD, lr=0.1).state_dict()
    generator = delta["samopt"]["ascent"]["generator"]
    delta = {**as_format1(delta), "samopt": {"format": 1, "delta_generator": generator}}
    with pytest.raises(ValueError, match="the state_dict is a DeltaSAM's and this optimizer a SAM"):
        samopt.SAM(mlp().parameters(), torch.optim.SGD, lr=0.1).load_state_dict(delta)
    fresh = samopt.SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    fresh.load_state_dict(as_format1(before))  # an older state of the right kind still loads
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])
    sam = samopt.SAM(mlp().parameters(), torch.optim.SGD, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="the state_dict is a SAM's and this optimizer a DeltaSAM: load it into a SAM"):
        samopt.DeltaSAM(mlp().parameters(), torch.optim.SGD, lr=0.1).load_state_dict(sam)
    delta = samopt.DeltaSAM(mlp().parameters(), torch.optim.SGD, lr=0.1).state_dict()
    delta["samopt"]["ascent"]["generator"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="the state_dict's delta_generator does not fit this DeltaSAM's generator"):
        samopt.DeltaSAM(mlp().parameters(), torch.optim.SGD, lr=0.1).load_state_dict(delta)
    nan_lr = opt.state_dict()
    nan_lr["param_groups"][0]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be a finite real number >= 0, got nan"):
        opt.load_state_dict(nan_lr)


def test_state_dict_refuses_the_perturbed_state():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    sd = opt.state_dict()
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"state_dict\(\) called between first_step\(\) and second_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) called between first_step\(\) and second_step"):
        opt.load_state_dict(sd)
    opt.restore()
    opt.load_state_dict(sd)


@pytest.mark.parametrize("attach_to", ["sam", "base"])
def test_lr_scheduler_on_either_object_drives_both(attach_to):
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt if attach_to == "sam" else opt.base_optimizer, 1, gamma=0.5)
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
            sched.step()
    assert opt.param_groups[0]["lr"] == opt.base_optimizer.param_groups[0]["lr"] == 0.125
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_param_groups_carry_their_own_rho_and_adaptive():
    model = mlp()
    decay, no_decay = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
    opt = samopt.SAM(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "adaptive": False, "rho": 0.0}],
        torch.optim.SGD,
        rho=1.0,
        adaptive=True,
        lr=0.1,
    )
    g0, g1 = opt.param_groups
    assert (g0["rho"], g0["adaptive"], g0["eta"], g0["weight_decay"]) == (1.0, True, 0.01, 5e-4)
    assert (g1["rho"], g1["adaptive"], g1["weight_decay"]) == (0.0, False, 0.0)
    x, y = vector_batch()
    F.cross_entropy(model(x), y).backward()
    w = [p.detach().clone() for p in decay]
    biases = [b.detach().clone() for b in no_decay]
    t_g = [(p.abs() + 0.01) * p.grad for p in decay] + [b.grad for b in no_decay]  # T = 1 where not adaptive
    norm = torch.sqrt(sum(t.pow(2).sum() for t in t_g))
    expected = [w0 + 1.0 * (w0.abs() + 0.01) ** 2 * p.grad / norm for w0, p in zip(w, decay, strict=True)]
    opt.first_step()
    assert_equal_tensors([b.detach() for b in no_decay], biases)  # rho = 0 in that group: not perturbed
    for p, e in zip(decay, expected, strict=True):
        torch.testing.assert_close(p.detach(), e)
    opt.restore()


def test_add_param_group_reaches_the_base_optimizer():
    model = mlp()
    opt = samopt.SAM([model[0].weight], torch.optim.SGD, rho=0.2, lr=0.1)
    opt.add_param_group({"params": [model[2].weight], "lr": 0.01, "rho": 0.0})
    assert len(opt.base_optimizer.param_groups) == 2
    g = opt.param_groups[1]
    assert (g["rho"], g["adaptive"], g["eta"], g["lr"], g["momentum"]) == (0.0, False, 0.01, 0.01, 0)
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['eta'\] must be a finite real number >= 0"):
        opt.add_param_group({"params": [model[2].bias], "eta": float("nan")})
    assert len(opt.param_groups) == 2


def test_resume_is_bit_exact_on_the_blas_norm_path():
    """Layers large enough for the CPU dot-product norm (functional.DOT_MIN_NUMEL) resume exactly too."""

    def build_big():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
        assert model[0].weight.numel() >= samopt.functional.DOT_MIN_NUMEL
        return model, samopt.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-3)

    def train_big(model, opt, start, steps):
        for i in range(start, start + steps):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(16, 256, generator=g), torch.randint(0, 3, (16,), generator=g)

            def closure(x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)

    model, opt = build_big()
    train_big(model, opt, 0, 4)
    half, half_opt = build_big()
    train_big(half, half_opt, 0, 2)
    blob = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": half_opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    resumed, resumed_opt = build_big()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train_big(resumed, resumed_opt, 2, 2)
    assert_equal_tensors(weights(resumed), weights(model))


@pytest.mark.parametrize("in_place", [False, True])
def test_samopt_keeps_one_parameter_sized_buffer(in_place):
    """The only tensors samopt itself holds: one buffer per perturbed parameter (w + e, or a copy of w)."""
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, perturb_in_place=in_place, lr=0.1)
    for _ in range(3):

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    held = opt.swap.nbytes
    assert held == sum(p.numel() * p.element_size() for p in model.parameters())
    assert opt.state == {}  # plain SGD without momentum keeps nothing, and samopt adds nothing to it
