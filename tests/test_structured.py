"""Structured (tensor) masks: the clean pass computes no gradient for the tensors they leave unperturbed."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, bn_net, conv_net, image_batch, reloaded, vector_batch, weights
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import samopt
from samopt.looksam import ReuseOrthogonal
from samopt.masks import NORM_LAYERS, DynamicSparseMask, FisherMask, RandomMask, SelectMask, sam_on
from samopt.schedules import EveryK

LR, RHO = 0.1, 0.2


def deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


def last_layer(model: nn.Sequential) -> SelectMask:
    return SelectMask(model, lambda module, name: module is model[-1])


class CountOps(TorchDispatchMode):
    """Counts the aten operators run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def recording_closure(model, x, y, log):
    """A closure that logs, per pass, the matrix products its backward ran and which parameters got a gradient."""

    def closure():
        loss = F.cross_entropy(model(x), y)
        with CountOps() as count:
            loss.backward()
        log.append((count.ops["mm"], [p.grad is not None for p in model.parameters()]))
        return loss

    return closure


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def run(model, opt, steps: int, offset: int = 0, batch=image_batch) -> None:
    for t in range(offset, offset + steps):
        opt.step(closure_for(model, *batch(seed=t)))


def test_the_clean_pass_skips_the_gradients_and_products_of_unperturbed_tensors():
    model = deep_mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=last_layer(model), lr=LR)
    log: list = []
    for t in range(3):
        opt.step(recording_closure(model, *vector_batch(seed=t), log))
    everything = [True] * 6
    # The backward of three linear layers: 5 products (no input gradient of the first layer). Step 0's mask is due
    # (computed after its clean pass), so that pass computes every gradient; from step 1 the clean pass computes the
    # last layer's weight gradient only: one product, and no gradient below it.
    assert log == [
        (5, everything),
        (5, everything),
        (1, [False, False, False, False, True, True]),
        (5, everything),
        (1, [False, False, False, False, True, True]),
        (5, everything),
    ]
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mask_kind", ["random", "select"])
def test_a_tensor_mask_keeping_every_tensor_is_sam_bit_for_bit(mask_kind):
    results = []
    for make in (
        lambda m: None,
        lambda m: (
            RandomMask(0.0, granularity="tensor", seed=0)
            if mask_kind == "random"
            else SelectMask(m, lambda module, name: True)
        ),
        lambda m: RandomMask(0.0, renormalize=True, seed=0),
    ):
        model = bn_net()
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=make(model), lr=LR, momentum=0.9)
        run(model, opt, 4)
        results.append(weights(model))
    assert_equal_tensors(results[0], results[1])
    assert_equal_tensors(results[0], results[2])


@pytest.mark.parametrize(
    "make",
    [
        lambda m, skip: RandomMask(0.5, granularity="tensor", update_interval=3, seed=1, skip_unperturbed=skip),
        lambda m, skip: DynamicSparseMask(
            0.5, total_steps=8, update_interval=3, granularity="tensor", seed=1, skip_unperturbed=skip,
        ),
        lambda m, skip: FisherMask(
            m, [image_batch(seed=100 + i, n=3) for i in range(4)], F.cross_entropy, num_samples=5,
            update_interval=3, granularity="tensor", skip_unperturbed=skip,
        ),
        lambda m, skip: sam_on(m, skip_unperturbed=skip),
    ],
)  # fmt: skip
def test_skipping_changes_no_result_and_a_tensor_mask_normalises_over_its_live_tensors(make):
    results = []
    for skip in (True, False):
        model = conv_net()
        mask = make(model, skip)
        assert mask.renormalize  # a tensor mask's default, skipping or not: the same perturbation
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=mask, lr=LR, momentum=0.9)
        run(model, opt, 7)  # mask updates at steps 0, 3, 6
        live = [bool(m.all()) for m in mask.masks]
        assert any(live) and not all(live) and all(bool(m.all()) or not bool(m.any()) for m in mask.masks)
        results.append(weights(model) + list(mask.masks))
    assert_equal_tensors(*results)


def test_the_perturbed_pass_and_the_update_equal_a_hand_computed_reference():
    model = deep_mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=last_layer(model), lr=LR)
    run(model, opt, 1, batch=vector_batch)  # the mask's first step
    w = weights(model)
    x, y = vector_batch(seed=1)
    run(model, opt, 1, offset=1, batch=vector_batch)

    ref = deep_mlp()
    with torch.no_grad():
        for p, t in zip(ref.parameters(), w, strict=True):
            p.copy_(t)
    params = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), params[-2:])  # the last layer's weight and bias only
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g))
    with torch.no_grad():
        for p, gi in zip(params[-2:], g, strict=True):
            p.add_(gi, alpha=float(RHO / norm))
    gp = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    expected = [t - LR * gi for t, gi in zip(w, gp, strict=True)]
    for a, b in zip(weights(model), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(weights(model)[0], w[0])  # the unperturbed tensors are updated too


def test_the_users_requires_grad_flags_are_restored_after_every_pass_and_after_an_exception():
    model = deep_mlp()
    model[0].bias.requires_grad_(False)  # the user's own choice: frozen
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=last_layer(model), lr=LR)
    flags = [p.requires_grad for p in model.parameters()]
    seen = []

    def closure():
        seen.append([p.requires_grad for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    x, y = vector_batch()
    for _ in range(2):
        opt.step(closure)
        assert [p.requires_grad for p in model.parameters()] == flags
    assert seen[2] == [False, False, False, False, True, True]  # inside the second clean pass
    assert seen[3] == flags and model[0].bias.grad is None

    def failing():
        seen.append([p.requires_grad for p in model.parameters()])
        raise KeyError("in the closure")

    before = weights(model)
    with pytest.raises(KeyError, match="in the closure"):
        opt.step(failing)
    assert seen[-1] == [False, False, False, False, True, True]
    assert [p.requires_grad for p in model.parameters()] == flags
    assert_equal_tensors(weights(model), before)
    model[2].weight.requires_grad_(False)  # changed between steps: honoured, and kept
    opt.step(closure)
    assert [p.requires_grad for p in model.parameters()] == [True, False, False, True, True, True]


def test_the_two_phase_api_skips_inside_first_pass_and_computes_everything_outside():
    results = []
    for inside in (True, False):
        model = deep_mlp()
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=last_layer(model), lr=LR)
        for t in range(3):
            x, y = vector_batch(seed=t)
            with opt.first_pass() if inside else torch.enable_grad():
                F.cross_entropy(model(x), y).backward()
            if t == 2:
                assert (model[0].weight.grad is None) == inside
            with opt.perturbed() as ascending:
                assert ascending
                F.cross_entropy(model(x), y).backward()
            opt.zero_grad()
        results.append(weights(model))
    assert_equal_tensors(*results)


def test_resume_is_bit_exact_with_a_tensor_mask():
    def fresh():
        model = bn_net()
        mask = DynamicSparseMask(0.5, total_steps=8, update_interval=3, granularity="tensor", seed=1)
        return model, samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=mask, lr=LR, momentum=0.9)

    model, opt = fresh()
    run(model, opt, 8, 0)
    straight = weights(model) + list(opt.mask.masks)
    model, opt = fresh()
    run(model, opt, 4, 0)
    model, opt = reloaded(model, opt, fresh)
    run(model, opt, 4, 4)
    assert_equal_tensors(weights(model) + list(opt.mask.masks), straight)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.frozen_bn = nn.BatchNorm2d(4, affine=False)
        self.norm_scale = nn.Parameter(torch.ones(4))  # named like a norm parameter, not one: not selected
        self.head = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.frozen_bn(self.gn(self.bn(self.conv(x)))) * self.norm_scale[:, None, None]
        return self.out(self.ln(self.head(h.mean((2, 3)))))


def test_sam_on_selects_exactly_the_affine_parameters_of_the_normalisation_layers():
    model = Block()
    mask = sam_on(model)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=mask, lr=LR)
    run(model, opt, 1)
    names = [n for n, _ in model.named_parameters()]
    live = [n for n, m in zip(names, mask.masks, strict=True) if bool(m.all())]
    assert live == ["bn.weight", "bn.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias"]
    assert all(bool(m.all()) or not bool(m.any()) for m in mask.masks)
    assert mask.density() == pytest.approx((8 + 8 + 12) / sum(p.numel() for p in model.parameters()))
    assert nn.LayerNorm in NORM_LAYERS and nn.GroupNorm in NORM_LAYERS and nn.BatchNorm2d in NORM_LAYERS


def test_bad_structured_masks_are_refused_naming_the_argument():
    model = deep_mlp()
    with pytest.raises(ValueError, match="sam_on: the model has no normalisation layer with affine parameters"):
        sam_on(model)
    with pytest.raises(ValueError, match="select chose no parameter of the model"):
        SelectMask(model, lambda module, name: False)
    with pytest.raises(TypeError, match="select must be a callable"):
        SelectMask(model, "last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="renormalize=False divides by the full gradient's norm"):
        RandomMask(0.5, granularity="tensor", renormalize=False)
    RandomMask(0.5, granularity="tensor", renormalize=False, skip_unperturbed=False)  # computes the full norm
    with pytest.raises(TypeError, match="skip_unperturbed must be True or False"):
        RandomMask(0.5, granularity="tensor", skip_unperturbed=1)  # type: ignore[arg-type]
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, mask=RandomMask(0.99, granularity="tensor"), lr=LR)
    before = weights(model)
    message = r"sparsity=0.99 leaves a budget of 1 parameter\(s\), which no whole tensor fits \(the smallest has 3\)"
    with pytest.raises(ValueError, match=message + ": the tensor mask would perturb nothing; lower sparsity"):
        run(model, opt, 1, batch=vector_batch)
    assert_equal_tensors(weights(model), before)
    frozen = deep_mlp()
    frozen[-1].requires_grad_(False)
    with pytest.raises(ValueError, match=r"every parameter the mask selected is frozen \(requires_grad=False\)"):
        samopt.SAM(frozen.parameters(), torch.optim.SGD, mask=last_layer(frozen), lr=LR)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, mask=last_layer(model), lr=LR)
    run(model, opt, 1, batch=vector_batch)
    state = opt.state_dict()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, mask=SelectMask(model, lambda m, n: m is model[0]), lr=LR)
    with pytest.raises(ValueError, match="the saved masks are not this SelectMask's selection"):
        opt.load_state_dict(state)
    other = deep_mlp()
    with pytest.raises(ValueError, match="none of the parameters the mask selected is in the optimizer"):
        samopt.SAM(model.parameters(), torch.optim.SGD, mask=last_layer(other), lr=LR)
    with pytest.raises(ValueError, match=r"needs \(a step that does not ascend.*drop schedule= or build the mask"):
        samopt.SAM(model.parameters(), torch.optim.SGD, mask=last_layer(model), schedule=EveryK(2), lr=LR)
    with pytest.raises(ValueError, match="drop descent= or build the mask with skip_unperturbed=False"):
        samopt.SAM(model.parameters(), torch.optim.SGD, mask=last_layer(model), descent=ReuseOrthogonal(0.7), lr=LR)
    samopt.SAM(model.parameters(), torch.optim.SGD, mask=RandomMask(0.5), schedule=EveryK(2), lr=LR)  # element: fine
    mask = last_layer(model)  # δ-SAM computes every gradient at w: nothing to refuse, nothing skipped
    opt = samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=mask, lr=LR)
    assert not opt.ascent.skips_clean_grads and opt.ascent.clean_params() is None


def test_grad_scaler_and_micro_batches_work_with_a_skipping_mask():
    """Scaling by a power of two is exact in fp32: scaled equals unscaled bit for bit; four micro-batches of two
    equal the batch of eight; an fp16 overflow at w on a skipping step skips the update."""
    results = []
    for mode in ("plain", "scaled", "micro"):
        model = deep_mlp()
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=last_layer(model), lr=LR, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        for t in range(4):
            x, y = vector_batch(seed=t)

            def closure(x=x, y=y, model=model, scaler=scaler, mode=mode):
                parts = 4 if mode == "micro" else 1
                for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
                    loss = F.cross_entropy(model(xs), ys) / parts
                    (scaler.scale(loss) if mode == "scaled" else loss).backward()
                return loss

            opt.step(closure, scaler=scaler if mode == "scaled" else None)
            if mode == "scaled":
                scaler.update()
        results.append(weights(model))
    assert_equal_tensors(results[0], results[1])
    for a, b in zip(results[0], results[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    model = deep_mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, mask=last_layer(model), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    run(model, opt, 1, batch=vector_batch)
    before, x, y = weights(model), *vector_batch(seed=1)

    passes = []

    def overflow():
        passes.append(1)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * 1e30).backward()
        if len(passes) == 1:
            assert model[0].weight.grad is None  # the clean pass skips (the perturbed pass, run unknowing, does not)
        return loss

    opt.step(overflow, scaler=scaler)
    scaler.update()
    assert passes == [1, 1]  # the default check="deferred" does not know of the overflow before the second pass
    assert_equal_tensors(weights(model), before)
    assert scaler.get_scale() == 2.0**15
