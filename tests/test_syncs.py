"""Host synchronisations per training step, counted with samopt.profiling.

A default step (``check="deferred"``, samopt's fused base optimizer) reads nothing back
from the device; the counts are pinned exactly, so that a new ``.item()`` on the hot
path fails here. The documented exceptions are pinned too: ``check="eager"`` reads the
norm in each pass, and a base optimizer that cannot skip on the device is read once.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_net, image_batch

import samopt
from samopt.masks import DynamicSparseMask, FisherMask
from samopt.profiling import SYNCS, count_ops


def test_the_counter_sees_every_way_a_tensor_is_read_back():
    t = torch.tensor([1.0, 0.0, 2.0])
    assert count_ops(lambda: t.sum() * 2).syncs == 0
    assert count_ops(lambda: t.sum().item()).by_op == {"aten::_local_scalar_dense": 1}
    assert count_ops(lambda: float(t[0]) + bool(t[1]) + int(t[2])).syncs == 3
    assert count_ops(lambda: t.nonzero()).by_op == {"aten::nonzero": 1}
    counted = count_ops(lambda: t.sum())
    assert counted.ops == 1 and set(SYNCS) == {"aten::_local_scalar_dense", "aten::nonzero"}


def _step(kind: str):
    torch.manual_seed(0)
    model = conv_net()
    x, y = image_batch(n=16)
    kw = {"lr": 0.1, "momentum": 0.9}

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), **kw)

        def sgd():
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()

        return sgd
    if kind == "delta-sam":
        delta = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, estimator="logit", **kw)

        def per_example():
            logits = model(x)
            return F.cross_entropy(logits, y, reduction="none"), logits

        return lambda: delta.step(per_example)
    if kind == "fp16":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        fp16 = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)

        def scaled():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        def with_scaler():
            fp16.step(scaled, scaler=scaler)
            scaler.update()

        return with_scaler
    if kind == "two-phase":
        sam = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)

        def two_phase():
            closure()
            sam.first_step(zero_grad=True)
            closure()
            sam.second_step(zero_grad=True)

        return two_phase
    masks = {
        "ssam-f": lambda: FisherMask(model, [(x, y)], F.cross_entropy, 0.5, num_samples=8, update_interval=None),
        "ssam-d-tensor": lambda: DynamicSparseMask(0.5, total_steps=100, update_interval=None, granularity="tensor"),
    }
    extra = {
        "asam": {"adaptive": True, "rho": 0.5},
        "eager": {"check": "eager"},
        "unfused": {"foreach": True},
        "clipped": {"max_grad_norm": 1.0},
        "bn-both": {"bn": "both"},
    }.get(kind, {"mask": masks[kind]()} if kind in masks else {})
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, **{"rho": 0.05, **extra, **kw})
    if kind == "msam":
        opt = samopt.MSAM(model.parameters(), torch.optim.SGD, rho=1.0, **kw)

        def msam():
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()

        return msam
    return lambda: opt.step(closure)


@pytest.mark.parametrize(
    "kind, syncs",
    [
        ("sgd", 0),
        ("sam", 0),
        ("two-phase", 0),
        ("asam", 0),
        ("fp16", 0),  # with a GradScaler, its update() included
        ("clipped", 0),
        ("bn-both", 0),
        ("ssam-f", 0),  # an element mask between updates
        ("ssam-d-tensor", 0),  # a tensor mask that skips the clean gradients of the others
        ("delta-sam", 0),  # the logit estimator and δ-SAM's weights
        ("msam", 0),
        ("eager", 2),  # check="eager": the norm read in each pass
        ("unfused", 1),  # a base optimizer that cannot skip on the device: read once, before its step
    ],
)
def test_host_synchronisations_per_step_are_the_documented_ones(kind, syncs):
    step = _step(kind)
    for _ in range(2):  # masks computed, state allocated
        step()
    counted = count_ops(step)
    assert counted.syncs == syncs, counted.by_op


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-model", "compiled-model"])
def test_an_in_place_step_keeps_the_parameters_where_a_cuda_graph_captured_them_and_never_syncs(compiled):
    """What CUDA graphs (model.compile(mode="reduce-overhead")) need of the optimizer, checked on the CPU: with
    perturb_in_place=True both passes run on the parameters' own storage, and the step reads nothing back."""
    torch.manual_seed(0)
    model = conv_net()
    if compiled:
        model.compile(backend="aot_eager")
    x, y = image_batch(n=16)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, perturb_in_place=True, lr=0.1, momentum=0.9)
    storage = [p.data_ptr() for p in model.parameters()]
    seen = []

    def closure():
        seen.append([p.data_ptr() for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert count_ops(lambda: opt.step(closure)).syncs == 0
    assert len(seen) == 6 and all(s == storage for s in seen)
