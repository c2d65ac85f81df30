"""Host synchronisations per training step, counted with samopt.profiling: the baseline issue 20 lowers.

These pin today's counts exactly, so that a new ``.item()`` on the hot path fails here;
the sync-free step of issue 20 will take them to 0 and change these numbers with it.
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
    extra = {"mask": masks[kind]()} if kind in masks else {"adaptive": True, "rho": 0.5} if kind == "asam" else {}
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
        ("sam", 2),  # the gradient norm read back in first_step (scale, finiteness) and in second_step
        ("two-phase", 2),
        ("asam", 2),
        ("ssam-f", 2),  # an element mask between updates
        ("ssam-d-tensor", 3),  # a skipping tensor mask: one more
        ("delta-sam", 5),  # and delta_weights: the median of the scores, the finiteness of the scores, the clip loop
        ("msam", 1),
    ],
)
def test_host_synchronisations_per_step_are_the_documented_ones(kind, syncs):
    step = _step(kind)
    for _ in range(2):  # masks computed, state allocated
        step()
    counted = count_ops(step)
    assert counted.syncs == syncs, counted.by_op
