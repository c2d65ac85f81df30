"""The pure kernels of samopt.functional against plain tensor math."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samopt import functional as kernels
from samopt import functional_reference as reference


def tensors(seed: int, shapes, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


SHAPES = [(3, 4), (5,), (2, 3, 2), (1,)]


def test_global_norm_is_norm_of_concatenation():
    ts = tensors(0, SHAPES)
    expected = torch.cat([t.reshape(-1) for t in ts]).norm()
    assert kernels.global_norm(ts).item() == pytest.approx(expected.item(), rel=1e-14)


def test_global_norm_mixes_dtypes_and_layouts():
    a, b = tensors(1, [(4, 3), (6,)])
    c = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)  # not contiguous
    ts = [a, b.float(), c, a.t()]
    expected = math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))
    out = kernels.global_norm(ts)
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_global_norm_empty_and_zero():
    assert kernels.global_norm([]).item() == 0.0
    assert kernels.global_norm([torch.zeros(3)]).item() == 0.0


def test_global_norm_propagates_non_finite():
    assert math.isinf(kernels.global_norm([torch.ones(2), torch.tensor([float("inf")])]).item())
    assert math.isnan(kernels.global_norm([torch.ones(2), torch.tensor([float("nan")])]).item())


def test_perturbation_norm_sam_and_asam():
    ps = tensors(2, SHAPES)
    gs = tensors(3, SHAPES)
    sam = math.sqrt(sum(float((g * g).sum()) for g in gs))
    asam = math.sqrt(sum(float((((p.abs() + 0.3) * g) ** 2).sum()) for p, g in zip(ps, gs, strict=True)))
    assert kernels.perturbation_norm(ps, gs).item() == pytest.approx(sam, rel=1e-14)
    assert kernels.perturbation_norm(ps, gs, adaptive=True, eta=0.3).item() == pytest.approx(asam, rel=1e-14)


def test_perturb_sam_adds_scaled_gradient():
    ps = tensors(4, SHAPES)
    gs = tensors(5, SHAPES)
    before = [p.clone() for p in ps]
    kernels.perturb_(ps, gs, scale=0.25)
    for p, b, g in zip(ps, before, gs, strict=True):
        torch.testing.assert_close(p, b + 0.25 * g, rtol=0, atol=1e-15)


def test_perturb_asam_uses_t_squared_at_w():
    ps = tensors(6, SHAPES)
    gs = tensors(7, SHAPES)
    before = [p.clone() for p in ps]
    kernels.perturb_(ps, gs, scale=0.5, adaptive=True, eta=0.01)
    for p, b, g in zip(ps, before, gs, strict=True):
        torch.testing.assert_close(p, b + 0.5 * (b.abs() + 0.01) ** 2 * g, rtol=0, atol=1e-14)


def test_asam_kernels_chunk_without_changing_results(monkeypatch):
    ps = tensors(8, [(7, 3), (4,), (10,), (2, 2)])
    gs = tensors(9, [(7, 3), (4,), (10,), (2, 2)])
    whole_norm = kernels.perturbation_norm(ps, gs, adaptive=True)
    whole = [p.clone() for p in ps]
    kernels.perturb_(whole, gs, scale=0.1, adaptive=True)
    seen = []
    real_chunks = kernels._chunks

    def spy(*lists):
        for chunk in real_chunks(*lists):
            seen.append(sum(t.numel() for t in chunk[0]))
            yield chunk

    monkeypatch.setattr(kernels, "CHUNK_NUMEL", 12)
    monkeypatch.setattr(kernels, "_chunks", spy)
    chunked_norm = kernels.perturbation_norm(ps, gs, adaptive=True)
    chunked = [p.clone() for p in ps]
    kernels.perturb_(chunked, gs, scale=0.1, adaptive=True)
    assert seen[:4] == [21, 4, 10, 4]  # the 21-element tensor alone, then chunks of <= 12
    assert chunked_norm.item() == pytest.approx(whole_norm.item(), rel=1e-14)
    for a, b in zip(chunked, whole, strict=True):
        assert torch.equal(a, b)


def test_clip_grads_matches_torch_clip_grad_norm():
    gs = tensors(10, SHAPES, dtype=torch.float32)
    ref = [g.clone().requires_grad_() for g in gs]
    for r, g in zip(ref, gs, strict=True):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, max_norm=0.5)
    kernels.clip_grads_(gs, kernels.global_norm(gs), 0.5)
    for r, g in zip(ref, gs, strict=True):
        torch.testing.assert_close(g, r.grad, rtol=1e-6, atol=0)
    assert kernels.global_norm(gs).item() == pytest.approx(0.5, rel=1e-5)


def test_clip_grads_leaves_small_gradients():
    gs = [torch.tensor([0.3, 0.4])]
    kernels.clip_grads_(gs, kernels.global_norm(gs), 1.0)
    assert torch.equal(gs[0], torch.tensor([0.3, 0.4]))


def test_unscale_grads_reports_overflow():
    gs = [torch.tensor([2.0, 4.0]), torch.tensor([8.0])]
    found = kernels.unscale_grads_(gs, 0.5)
    assert found.item() == 0.0
    assert torch.equal(gs[0], torch.tensor([1.0, 2.0])) and torch.equal(gs[1], torch.tensor([4.0]))
    bad = [torch.tensor([1.0]), torch.tensor([float("inf"), 1.0])]
    assert kernels.unscale_grads_(bad, 0.5).item() == 1.0
    assert kernels.unscale_grads_([torch.tensor([float("nan")])], 1.0).item() == 1.0


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=4),
    rho=st.floats(1e-4, 10.0),
    seed=st.integers(0, 2**16),
    adaptive=st.booleans(),
)
def test_perturbation_has_radius_rho_in_its_metric(shapes, rho, seed, adaptive):
    """||T^-1 e|| = rho: the SAM (T = 1) and ASAM perturbations lie on the rho-sphere of their metric."""
    ps = tensors(seed, shapes)
    gs = tensors(seed + 1, shapes)
    w = [p.clone() for p in ps]
    n = kernels.perturbation_norm(ps, gs, adaptive=adaptive, eta=0.01).item()
    kernels.perturb_(ps, gs, scale=rho / n, adaptive=adaptive, eta=0.01)
    t = [(x.abs() + 0.01) if adaptive else torch.ones_like(x) for x in w]
    radius = math.sqrt(sum(float((((p - x) / ti) ** 2).sum()) for p, x, ti in zip(ps, w, t, strict=True)))
    assert radius == pytest.approx(rho, rel=1e-9)


def test_kernels_accept_empty_lists():
    kernels.perturb_([], [], scale=1.0)
    kernels.perturb_([], [], scale=1.0, adaptive=True, masks=[])
    assert float(kernels.perturbation_norm([], [], masks=[])) == 0.0


@settings(max_examples=80, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    adaptive=st.booleans(),
    masked=st.booleans(),
    into=st.sampled_from(["in place", "out"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_the_kernels_agree_with_the_plain_reference(shapes, seed, adaptive, masked, into, dtype):
    """samopt.functional's multi-tensor kernels compute what samopt.functional_reference defines, per tensor."""
    ps, gs = tensors(seed, shapes, dtype), tensors(seed + 1, shapes, dtype)
    g = torch.Generator().manual_seed(seed + 2)
    masks = [torch.rand(p.shape, generator=g) < 0.5 for p in ps] if masked else None
    norm = kernels.perturbation_norm(ps, gs, adaptive=adaptive, eta=0.05, masks=masks).item()
    expected_norm = reference.perturbation_norm(ps, gs, adaptive=adaptive, eta=0.05, masks=masks)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert norm == pytest.approx(expected_norm, rel=tol)
    assert kernels.global_norm(gs).item() == pytest.approx(reference.global_norm(gs), rel=tol)
    if expected_norm == 0:
        return
    scale = 0.3 / expected_norm
    expected = reference.perturb(ps, gs, scale=scale, adaptive=adaptive, eta=0.05, masks=masks)
    out = [torch.empty_like(p) for p in ps] if into == "out" else None
    before = [p.clone() for p in ps]
    kernels.perturb_(ps, gs, scale=scale, adaptive=adaptive, eta=0.05, masks=masks, out=out)
    got = out if out is not None else ps
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if out is not None:  # the weights were only read
        for p, b in zip(ps, before, strict=True):
            assert torch.equal(p, b)


def test_clipping_agrees_with_the_reference_coefficient():
    gs = tensors(11, SHAPES)
    total = reference.global_norm(gs)
    expected = [g * reference.clip_coefficient(total, 0.7) for g in gs]
    kernels.clip_grads_(gs, kernels.global_norm(gs), 0.7)
    for a, b in zip(gs, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
