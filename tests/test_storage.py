"""Where w + e lives: a swapped buffer by default, the parameter's own storage for views and subclasses."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, mlp, vector_batch, weights
from torch import nn

import samopt
from samopt import functional as SF


def tensors(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_out_writes_what_in_place_would_and_leaves_w(adaptive):
    shapes = [(3, 4), (5,), (2, 3, 2)]
    ps, gs = tensors(0, shapes), tensors(1, shapes)
    w = [p.clone() for p in ps]
    out = [torch.empty_like(p) for p in ps]
    SF.perturb_(ps, gs, scale=0.3, adaptive=adaptive, out=out)
    assert_equal_tensors(ps, w)
    SF.perturb_(ps, gs, scale=0.3, adaptive=adaptive)
    assert_equal_tensors(out, ps)


def flat_linear(n_in=5, n_out=3):
    """A Linear whose weight and bias are views into one flat buffer, as FSDP or DeepSpeed lay them out."""
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out)
    flat = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    layer.weight.data = flat[: n_in * n_out].view(n_out, n_in)
    layer.bias.data = flat[n_in * n_out :]
    return layer, flat


def test_views_into_a_flat_buffer_are_perturbed_in_place():
    x, y = vector_batch()
    layer, flat = flat_linear()
    reference = nn.Linear(5, 3)
    reference.load_state_dict(layer.state_dict())
    opt = samopt.SAM(layer.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    ref_opt = samopt.SAM(reference.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    seen = []

    def closure():
        seen.append(flat.clone())  # on the second call: the flat buffer itself holds w + e
        loss = F.cross_entropy(layer(x), y)
        loss.backward()
        return loss

    w0 = flat.clone()
    opt.step(closure)
    assert not torch.equal(seen[1], w0)
    assert layer.weight.data_ptr() == flat.data_ptr()  # still a view into the same buffer

    def ref_closure():
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        return loss

    ref_opt.step(ref_closure)
    assert_equal_tensors(weights(layer), weights(reference))


def test_parameter_subclasses_are_perturbed_in_place():
    class Tagged(nn.Parameter):
        pass

    x, y = vector_batch()
    model = mlp()
    model[0].weight = Tagged(model[0].weight.detach().clone())
    storage = model[0].weight.data_ptr()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    ptrs = []

    def closure():
        ptrs.append(model[0].weight.data_ptr())
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert ptrs == [storage, storage]


def test_plain_parameters_are_swapped_and_come_back_to_their_own_storage():
    x, y = vector_batch()
    model = mlp()
    storages = [p.data_ptr() for p in model.parameters()]
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    during = []

    def closure():
        during.append([p.data_ptr() for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
        assert during[-2] == storages
        assert all(a != b for a, b in zip(during[-1], storages, strict=True))
        assert [p.data_ptr() for p in model.parameters()] == storages


def test_storage_replaced_during_the_perturbed_pass_is_an_error():
    x, y = vector_batch()
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    w0 = weights(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    model[0].weight.data = model[0].weight.data.clone()  # what a storage-managing wrapper would do
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"1 parameter\(s\) had their \.data replaced .* perturb_in_place=True"):
        opt.second_step()
    assert_equal_tensors(weights(model), w0)


def test_perturb_in_place_must_be_a_bool():
    with pytest.raises(TypeError, match=r"perturb_in_place must be True or False, got 'yes' \(str\)"):
        samopt.SAM(mlp().parameters(), torch.optim.SGD, perturb_in_place="yes", lr=0.1)
