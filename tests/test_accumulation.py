"""Gradient accumulation: both passes replay the same micro-batches."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, bn_net, buffers, image_batch, mlp, vector_batch, weights

import samopt

MICRO = 4


def accumulate(model, x, y):
    """Backward of the full-batch mean loss, as MICRO micro-batches; returns the loss."""
    total = 0.0
    for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
        loss = F.cross_entropy(model(xs), ys) / MICRO
        loss.backward()
        total += loss.detach()
    return total


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("api", ["closure", "two-phase"])
def test_four_micro_batches_equal_the_full_batch(api, adaptive, in_place):
    full, micro = mlp(), mlp()
    kw = dict(rho=0.5 if adaptive else 0.05, adaptive=adaptive, perturb_in_place=in_place, lr=0.1, momentum=0.9)
    opt_full = samopt.SAM(full.parameters(), torch.optim.SGD, **kw)
    opt_micro = samopt.SAM(micro.parameters(), torch.optim.SGD, **kw)
    for step in range(3):
        x, y = vector_batch(seed=step, n=16)

        def closure_full(x=x, y=y):
            loss = F.cross_entropy(full(x), y)
            loss.backward()
            return loss

        loss_full = opt_full.step(closure_full)
        if api == "closure":
            loss_micro = opt_micro.step(lambda x=x, y=y: accumulate(micro, x, y))
        else:
            loss_micro = accumulate(micro, x, y)
            opt_micro.first_step()
            accumulate(micro, x, y)
            opt_micro.second_step()
        assert loss_micro.item() == pytest.approx(loss_full.item(), abs=1e-6)
    for a, b in zip(weights(micro), weights(full), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_accumulation_keeps_bn_statistics_of_the_clean_micro_batches_only():
    model = bn_net()
    reference = copy.deepcopy(model)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = image_batch(n=16)
    for xs in x.chunk(MICRO):
        reference(xs)
    opt.step(lambda: accumulate(model, x, y))
    assert_equal_tensors(buffers(model), buffers(reference))
    assert model[1].num_batches_tracked.item() == MICRO
