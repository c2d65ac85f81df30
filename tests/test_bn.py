"""BatchNorm and other module buffers across the perturbed pass."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, bn_net, buffers, image_batch, weights
from torch import nn

import samopt
from samopt import BufferGuard


def global_pre_hooks() -> int:
    return len(nn.modules.module._global_forward_pre_hooks)


def run_step(model, opt, x, y, api, record=None):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if record is not None:
            record.append(weights(model))
        return loss

    if api == "closure":
        opt.step(closure)
    else:
        closure()
        opt.first_step()
        closure()
        opt.second_step()


@pytest.mark.parametrize("api", ["closure", "two-phase"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_first_keeps_only_the_clean_pass_statistics(api, momentum):
    x, y = image_batch()
    model = bn_net(momentum)
    clean_only = copy.deepcopy(model)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    for step in range(3):
        clean_only = copy.deepcopy(model)
        clean_only(x)  # the clean forward alone, at the same weights and buffers
        run_step(model, opt, x, y, api)
        assert_equal_tensors(buffers(model), buffers(clean_only))
        assert model[1].num_batches_tracked.item() == step + 1
    assert global_pre_hooks() == 0


def test_bn_both_updates_the_statistics_at_w_plus_e_too():
    x, y = image_batch()
    model = bn_net()
    reference = copy.deepcopy(model)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, bn="both", lr=0.1)
    seen = []
    run_step(model, opt, x, y, "closure", record=seen)
    reference(x)  # clean pass at w
    with torch.no_grad():
        for p, w_plus_e in zip(reference.parameters(), seen[1], strict=True):
            p.copy_(w_plus_e)
    reference(x)  # second pass at w + e
    assert_equal_tensors(buffers(model), buffers(reference))
    assert model[1].num_batches_tracked.item() == 2


def test_bn_first_differs_from_bn_both():
    x, y = image_batch()
    a, b = bn_net(), bn_net()
    run_step(a, samopt.SAM(a.parameters(), torch.optim.SGD, rho=0.5, lr=0.1), x, y, "closure")
    run_step(b, samopt.SAM(b.parameters(), torch.optim.SGD, rho=0.5, bn="both", lr=0.1), x, y, "closure")
    assert not torch.equal(a[1].running_mean, b[1].running_mean)


@pytest.mark.parametrize("in_place", [False, True])
def test_interrupt_in_the_perturbed_pass_restores_weights_and_buffers(in_place):
    x, y = image_batch()
    model = bn_net()
    storages = [p.data_ptr() for p in model.parameters()]
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturb_in_place=in_place, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss

    w0 = weights(model)
    reference = copy.deepcopy(model)
    reference(x)
    expected_buffers = buffers(reference)
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert_equal_tensors(weights(model), w0)
    assert [p.data_ptr() for p in model.parameters()] == storages
    assert_equal_tensors(buffers(model), expected_buffers)
    assert global_pre_hooks() == 0
    opt.state_dict()  # not left in the perturbed state
    calls.clear()
    run_step(model, opt, x, y, "two-phase")  # usable again


def test_restore_undoes_a_first_step():
    x, y = image_batch()
    model = bn_net()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    w0 = weights(model)
    F.cross_entropy(model(x), y).backward()
    b1 = buffers(model)
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    assert not torch.equal(model[0].weight, w0[0])
    opt.restore()
    assert_equal_tensors(weights(model), w0)
    assert_equal_tensors(buffers(model), b1)
    assert global_pre_hooks() == 0
    opt.restore()  # a no-op when nothing is perturbed
    with pytest.raises(RuntimeError, match=r"second_step\(\) called without a preceding first_step"):
        opt.second_step()


def test_buffer_guard_snapshots_training_modules_once_and_restores_in_place():
    model = bn_net()
    model[5].eval()  # BatchNorm1d in eval mode: its buffers cannot change
    x, _ = image_batch()
    running_mean = model[1].running_mean
    before = buffers(model)
    guard = BufferGuard()
    with guard:
        assert guard.active
        model(x)
        model(x)  # a module that runs twice is snapshotted once, before its first run
        assert set(guard._saved) == set(model.modules())  # the whole tree, on the outer call
        copied = {m for m, snapshot in guard._saved.items() if snapshot}
        assert copied == {model[1]}  # the eval-mode BatchNorm1d is not copied
        assert not torch.equal(model[1].running_mean, before[0])
    assert not guard.active and global_pre_hooks() == 0
    assert_equal_tensors(buffers(model), before)
    assert model[1].running_mean is running_mean  # restored in place, same tensor object


def test_buffer_guard_restores_reassigned_buffers_and_refuses_double_start():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count = self.count + 1  # replaces the buffer object instead of mutating it
            return x

    m = Counter()
    original = m.count
    guard = BufferGuard()
    guard.start()
    with pytest.raises(RuntimeError, match=r"already active"):
        guard.start()
    m(torch.ones(1))
    guard.restore()
    assert m.count is original and m.count.item() == 0.0


@pytest.mark.parametrize("style", ["torch.compile(model)", "model.compile()"])
def test_bn_first_holds_for_compiled_models(style):
    """Inside a compiled module the submodules run no hooks; the outer call must cover them."""
    x, y = image_batch()
    model = bn_net()
    if style == "model.compile()":
        model.compile(backend="aot_eager")
        compiled = model
    else:
        compiled = torch.compile(model, backend="aot_eager")
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    for step in range(2):
        after_clean_pass = []

        def closure(after_clean_pass=after_clean_pass):
            after_clean_pass.append(buffers(model))  # on the second call: the state after pass 1
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "global hooks fire an extra time for OptimizedModule"
            opt.step(closure)
        assert_equal_tensors(buffers(model), after_clean_pass[1])
        assert model[1].num_batches_tracked.item() == step + 1
