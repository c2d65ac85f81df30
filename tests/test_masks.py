"""Sparse SAM masks: selection, Fisher scores, dynamic drop/grow, the masked perturbation, state."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equal_tensors, conv_net, image_batch, mlp, reloaded, vector_batch, weights
from torch import nn

import samopt
from samopt.masks import DynamicSparseMask, FisherMask, RandomMask, keep_count, select_top


def fisher_batches(n_batches: int = 6, size: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [image_batch(seed=100 + i, n=size) for i in range(n_batches)]


def fisher_reference(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
    """sum_i (d CE(model(x_i), y_i) / dw)^2 by a plain loop of batch-1 passes on a copy."""
    ref = copy.deepcopy(model)
    acc = [torch.zeros_like(p) for p in ref.parameters()]
    for x, y in zip(xs, ys, strict=True):
        ref.zero_grad()
        F.cross_entropy(ref(x[None]), y[None]).backward()
        for a, p in zip(acc, ref.parameters(), strict=True):
            a += p.grad.square()
    return acc


def top_set(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks of the k largest entries of all scores together, by a full sort."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True).indices[:k]] = True
    return [m.view(s.shape) for m, s in zip(chosen.split([s.numel() for s in scores]), scores, strict=True)]


def cat_samples(batches, start, n):
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    return xs[start : start + n], ys[start : start + n]


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("numel", "sparsity", "expected"), [(10, 0.7, 3), (100, 0.29, 71), (7, 0.0, 7), (9, 0.5, 4), (3, 0.99, 0)]
)
def test_keep_count_is_the_exact_floor(numel, sparsity, expected):
    assert keep_count(numel, sparsity) == expected


def test_select_top_is_one_global_top_k_across_tensors():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(4, 5, generator=g), torch.rand(7, generator=g) * 0.5, torch.rand(2, 3, generator=g) * 2]
    for k in (0, 1, 13, 33):
        masks = select_top(scores, k)
        assert_equal_tensors(masks, top_set(scores, k))
        assert sum(int(m.sum()) for m in masks) == k


def test_tensor_granularity_fills_the_budget_greedily_by_mean_score():
    # sizes 4, 3, 5, 2 with means 0.9, 0.8, 0.7, 0.1; budget 7: take the 4 (3 left), the 3 (0 left), nothing else
    scores = [torch.full((4,), 0.9), torch.full((3,), 0.8), torch.full((5,), 0.7), torch.full((2,), 0.1)]
    assert [bool(m.all()) for m in select_top(scores, 7, granularity="tensor")] == [True, True, False, False]
    # budget 6: the 4 (2 left), the 3 does not fit, the 5 does not fit, the 2 does
    masks = select_top(scores, 6, granularity="tensor")
    assert [bool(m.all()) for m in masks] == [True, False, False, True]
    assert all(bool(m.all()) or not bool(m.any()) for m in masks)


def test_random_mask_density_is_exact_and_seeded():
    model = mlp()  # 66 parameters
    x, y = vector_batch()
    densities, masks = [], []
    for seed in (0, 0, 1):
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=RandomMask(0.3, seed=seed), lr=0.0)
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        opt.restore()
        densities.append(opt.mask_density())
        masks.append(opt.mask.masks)
    assert densities == [math.floor(66 * 0.7) / 66] * 3
    assert_equal_tensors(masks[0], masks[1])
    assert any(not torch.equal(a, b) for a, b in zip(masks[0], masks[2], strict=True))


def test_random_mask_is_redrawn_every_update_interval():
    model = mlp()
    x, y = vector_batch()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=RandomMask(0.5, update_interval=2), lr=0.1)
    seen = []
    for _ in range(5):
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        seen.append([m.clone() for m in opt.mask.masks])
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
    same = [all(torch.equal(a, b) for a, b in zip(seen[i], seen[i + 1], strict=True)) for i in range(4)]
    assert same == [True, False, True, False]  # new masks at steps 0, 2 and 4


# -------------------------------------------------------- masked perturbation


def masked_step(mask, adaptive=False, in_place=False):
    """One first_step on the mlp; returns (w, g, masks, weights at w + e)."""
    model = mlp()
    x, y = vector_batch()
    opt = samopt.SAM(
        model.parameters(), torch.optim.SGD, rho=0.2, adaptive=adaptive, mask=mask, lr=0.1, perturb_in_place=in_place
    )
    F.cross_entropy(model(x), y).backward()
    w, g = weights(model), [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    result = w, g, [m.clone() for m in opt.mask.masks], weights(model)
    opt.restore()  # the BatchNorm guard's global hook is not left behind
    return result


@pytest.mark.parametrize("in_place", [False, True])
def test_masked_sam_perturbs_the_live_entries_by_rho_g_over_the_full_norm(in_place):
    w, g, masks, pert = masked_step(RandomMask(0.5, seed=3), in_place=in_place)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
    e_norm2 = 0.0
    for wi, gi, mi, pi in zip(w, g, masks, pert, strict=True):
        assert torch.equal(pi[~mi], wi[~mi])  # dead entries are not touched
        expected = wi.double() + 0.2 * gi.double() / norm
        torch.testing.assert_close(pi[mi].double(), expected[mi], rtol=1e-6, atol=1e-7)
        e_norm2 += float(((0.2 * gi.double() / norm)[mi] ** 2).sum())
    assert math.sqrt(e_norm2) < 0.2  # the norm is the full gradient's, so ||e|| < rho


def test_renormalize_divides_by_the_masked_norm():
    w, g, masks, pert = masked_step(RandomMask(0.5, seed=3, renormalize=True))
    norm = math.sqrt(sum(float(((t.double() * m) ** 2).sum()) for t, m in zip(g, masks, strict=True)))
    for wi, gi, mi, pi in zip(w, g, masks, pert, strict=True):
        assert torch.equal(pi[~mi], wi[~mi])
        torch.testing.assert_close(pi.double(), wi.double() + mi * 0.2 * gi.double() / norm, rtol=1e-6, atol=1e-7)


def test_masked_asam_scales_by_t_squared_and_uses_the_full_t_g_norm():
    w, g, masks, pert = masked_step(RandomMask(0.5, seed=4), adaptive=True)
    t = [wi.double().abs() + 0.01 for wi in w]
    norm = math.sqrt(sum(float(((ti * gi.double()) ** 2).sum()) for ti, gi in zip(t, g, strict=True)))
    for wi, gi, mi, ti, pi in zip(w, g, masks, t, pert, strict=True):
        expected = wi.double() + mi * 0.2 * ti**2 * gi.double() / norm
        torch.testing.assert_close(pi.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize(
    "make", [lambda: RandomMask(0.0), lambda: DynamicSparseMask(0.0, total_steps=5, update_interval=1)]
)
def test_sparsity_zero_is_sam_bit_for_bit(make, in_place):
    x, y = vector_batch()
    results = []
    for mask in (None, make()):
        model = mlp()
        opt = samopt.SAM(
            model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1, momentum=0.9, perturb_in_place=in_place
        )
        for _ in range(5):
            opt.step(lambda model=model: _loss(model, x, y))
        results.append(weights(model))
    assert_equal_tensors(*results)


def _loss(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def test_ssamf_with_sparsity_zero_is_sam_bit_for_bit():
    x, y = image_batch(n=8)
    results = []
    for sparse in (False, True):
        model = conv_net()
        kw = {"rho": 0.1, "lr": 0.1, "momentum": 0.9}
        if sparse:
            opt = samopt.SSAMF(
                model.parameters(),
                torch.optim.SGD,
                model=model,
                fisher_data=fisher_batches(),
                loss_fn=F.cross_entropy,
                sparsity=0.0,
                num_samples=4,
                update_interval=2,
                **kw,
            )
        else:
            opt = samopt.SAM(model.parameters(), torch.optim.SGD, **kw)
        for _ in range(4):
            opt.step(lambda model=model: _loss(model, x, y))
        results.append(weights(model) + [b.clone() for b in model.buffers()])
    assert_equal_tensors(*results)


def test_a_parameter_whose_mask_is_all_off_is_not_touched():
    model = mlp()
    x, y = vector_batch()
    mask = RandomMask(0.6, granularity="tensor", seed=0)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    storages = [p.data_ptr() for p in model.parameters()]
    opt.first_step()
    live = [bool(m.all()) for m in mask.masks]
    assert any(live) and not all(live)
    for p, ptr, on in zip(model.parameters(), storages, live, strict=True):
        assert (p.data_ptr() == ptr) == (not on)  # live ones point at w + e, dead ones keep their storage
    assert sum(p.numel() for p, on in zip(model.parameters(), live, strict=True) if on) <= keep_count(66, 0.6)
    opt.restore()


# ------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("vectorize", [True, False])
def test_fisher_scores_and_mask_equal_a_per_sample_loop_and_the_step_perturbs_exactly_the_top_k(vectorize):
    model = conv_net()
    batches = fisher_batches(n_batches=8, size=3)
    mask = FisherMask(
        model, batches, F.cross_entropy, sparsity=0.7, num_samples=7, update_interval=1, chunk_size=3,
        vectorize=vectorize,
    )  # fmt: skip
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1)
    x, y = image_batch(seed=5, n=8)
    for step, start in enumerate((0, 7)):  # the second update continues where the first stopped
        ref = fisher_reference(model, *cat_samples(batches, start, 7))
        expected = top_set(ref, keep_count(mask.numel, 0.7))
        F.cross_entropy(model(x), y).backward()
        w, g = weights(model), [p.grad.clone() for p in model.parameters()]
        opt.first_step()
        assert_equal_tensors(mask.masks, expected)
        assert mask.last_update == step
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
        for wi, gi, mi, pi in zip(w, g, mask.masks, model.parameters(), strict=True):
            assert torch.equal(pi.detach()[~mi], wi[~mi])
            torch.testing.assert_close(
                pi.detach()[mi].double(), (wi.double() + 0.1 * gi.double() / norm)[mi], rtol=1e-6, atol=1e-7
            )
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
    # the scores themselves, against the loop, on the current weights
    scores = mask.scores(list(model.parameters()))
    for a, b in zip(scores, fisher_reference(model, *cat_samples(batches, 14, 7)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_fisher_data_wraps_around_when_exhausted():
    model = conv_net()
    batches = fisher_batches(n_batches=2, size=3)  # 6 examples
    mask = FisherMask(model, batches, F.cross_entropy, num_samples=4)
    samopt.SAM(model.parameters(), torch.optim.SGD, mask=mask, lr=0.1)
    xs = [mask.samples(4)[0] for _ in range(3)]
    all_x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(xs[0], all_x[:4], rtol=0, atol=0)
    torch.testing.assert_close(xs[1], torch.cat([all_x[4:6], all_x[:2]]), rtol=0, atol=0)
    torch.testing.assert_close(xs[2], all_x[2:6], rtol=0, atol=0)


@pytest.mark.parametrize("vectorize", [True, False])
def test_fisher_pass_leaves_buffers_mode_gradients_and_rng_untouched(vectorize):
    model = conv_net(dropout=0.5)  # dropout in training mode draws random numbers
    model[1].eval()  # a mixed-mode model: the pass must keep every module's own flag
    x, y = image_batch(n=8)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    bufs = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    xs, ys = cat_samples(fisher_batches(), 0, 18)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=4, shuffle=True)
    mask = FisherMask(model, shuffled, F.cross_entropy, num_samples=9, chunk_size=4, fisher_labels="sampled",
                      vectorize=vectorize, seed=0)  # fmt: skip
    samopt.SAM(model.parameters(), torch.optim.SGD, mask=mask, lr=0.1)
    rng = torch.get_rng_state()
    scores = mask.scores(list(model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_equal_tensors([p.grad for p in model.parameters()], grads)
    assert_equal_tensors(list(model.buffers()), bufs)
    assert [m.training for m in model.modules()] == modes
    assert all(bool((s >= 0).all()) for s in scores) and sum(float(s.sum()) for s in scores) > 0


@pytest.mark.parametrize("vectorize", [True, False])
def test_sampled_fisher_labels_follow_the_model_prediction(vectorize):
    # a model this confident predicts one class for sure: sampled labels = its argmax, not the true labels
    model = conv_net()
    with torch.no_grad():
        model[-1].bias.copy_(torch.tensor([0.0, 300.0, 0.0]))
    batches = fisher_batches()
    sampled = FisherMask(
        model, batches, F.cross_entropy, num_samples=6, fisher_labels="sampled", seed=0, vectorize=vectorize
    )
    samopt.SAM(model.parameters(), torch.optim.SGD, mask=sampled, lr=0.1)
    xs, ys = cat_samples(batches, 0, 6)
    assert (ys != 1).any()
    ref = fisher_reference(model, xs, torch.ones_like(ys))
    for a, b in zip(sampled.scores(list(model.parameters())), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_sampled_fisher_labels_are_reproducible_from_the_seed():
    def scores(seed):
        model = conv_net()
        mask = FisherMask(model, fisher_batches(), F.cross_entropy, num_samples=12, fisher_labels="sampled", seed=seed)
        samopt.SAM(model.parameters(), torch.optim.SGD, mask=mask, lr=0.1)
        return mask.scores(list(model.parameters()))

    assert_equal_tensors(scores(1), scores(1))
    assert any(not torch.equal(a, b) for a, b in zip(scores(1), scores(2), strict=True))


def test_fisher_tensor_granularity_ranks_tensors_by_mean_score():
    model = conv_net()
    batches = fisher_batches()
    mask = FisherMask(model, batches, F.cross_entropy, sparsity=0.5, num_samples=5, granularity="tensor")
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, mask=mask, lr=0.1)
    ref = fisher_reference(model, *cat_samples(batches, 0, 5))
    x, y = image_batch(n=8)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    budget, expected = keep_count(mask.numel, 0.5), []
    for i in sorted(range(len(ref)), key=lambda i: -float(ref[i].mean())):
        if ref[i].numel() <= budget:
            expected.append(i)
            budget -= ref[i].numel()
    assert [i for i, m in enumerate(mask.masks) if bool(m.all())] == sorted(expected)
    assert all(bool(m.all()) or not bool(m.any()) for m in mask.masks)
    opt.restore()


@pytest.mark.parametrize("vectorize", [True, False])
def test_fisher_scores_of_complex_parameters_are_squared_magnitudes(vectorize):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).to(torch.cfloat)
    xs, ys = torch.randn(5, 4, dtype=torch.cfloat, generator=g), torch.randint(0, 3, (5,), generator=g)

    def loss_fn(out, y, reduction="mean"):
        return F.cross_entropy(out.abs(), y, reduction=reduction)

    mask = FisherMask(model, [(xs, ys)], loss_fn, sparsity=0.5, num_samples=5, vectorize=vectorize)
    samopt.SAM(model.parameters(), torch.optim.SGD, mask=mask, lr=0.1)
    ref = [torch.zeros(p.shape) for p in model.parameters()]
    for x, y in zip(xs, ys, strict=True):  # |d loss / dw|^2, real and imaginary parts together
        model.zero_grad()
        loss_fn(model(x[None]), y[None]).backward()
        for r, p in zip(ref, model.parameters(), strict=True):
            r += p.grad.abs().square()
    for got, want in zip(mask.scores(list(model.parameters())), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ dynamic


def run_dynamic(mask, steps, lr=0.05):
    """Train the mlp with the two-phase API; record (old masks, clean grads, new masks) at each step."""
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=lr)
    log = []
    for t in range(steps):
        x, y = vector_batch(seed=t)
        old = None if mask.masks is None else [m.clone() for m in mask.masks]
        F.cross_entropy(model(x), y).backward()
        g = [p.grad.abs().clone() for p in model.parameters()]
        opt.first_step()
        log.append((old, g, [m.clone() for m in mask.masks]))
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
    return log


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("grow", ["random", "gradient"])
def test_dynamic_mask_drops_the_smallest_gradients_and_keeps_the_live_count_exact(grow):
    total, alpha = 50, 0.5
    mask = DynamicSparseMask(0.5, total_steps=total, drop_rate=alpha, grow=grow, update_interval=1, seed=0)
    log = run_dynamic(mask, 54)
    budget = keep_count(66, 0.5)
    assert int(flat(log[0][2]).sum()) == budget  # the random start
    for t, (old, g, new) in enumerate(log[1:], start=1):
        old, g, new = flat(old), flat(g), flat(new)
        dr = alpha * (1 + math.cos(math.pi * min(t, total) / total)) / 2
        keep = math.floor(66 * 0.5 * (1 - dr))
        kept, dropped, grown = old & new, old & ~new, new & ~old
        assert int(new.sum()) == budget
        assert int(kept.sum()) == keep
        assert int(grown.sum()) == budget - keep
        if dropped.any():
            assert float(g[dropped].max()) <= float(g[kept].min())
        if grow == "gradient" and grown.any() and (~old & ~new).any():
            assert float(g[grown].min()) >= float(g[~old & ~new].max())
    assert [int((flat(o) & ~flat(n)).sum()) for o, _, n in log[50:]] == [0, 0, 0, 0]  # from total_steps on: dr = 0


def test_dynamic_mask_regrows_dropped_entries_when_too_few_were_dead():
    mask = DynamicSparseMask(0.1, total_steps=100, drop_rate=1.0, update_interval=1, seed=0)
    log = run_dynamic(mask, 3)
    budget = keep_count(66, 0.1)  # 59 live, 7 dead: dropping ~59 needs regrowth of dropped entries
    for old, _, new in log[1:]:
        old, new = flat(old), flat(new)
        assert int(new.sum()) == budget
        assert bool(new[~old].all())  # every previously dead entry was grown first


def test_dynamic_drop_rate_follows_the_cosine_schedule():
    mask = DynamicSparseMask(0.5, total_steps=100, drop_rate=0.4)
    assert [mask.drop_rate_at(t) for t in (0, 50, 100, 150)] == pytest.approx([0.4, 0.2, 0.0, 0.0], abs=1e-15)


def test_dynamic_weight_drop_keeps_the_largest_weights():
    mask = DynamicSparseMask(0.5, total_steps=10, drop="weight", update_interval=1, seed=0)
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.0)
    x, y = vector_batch()
    for _ in range(2):
        old = None if mask.masks is None else flat(mask.masks).clone()
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        F.cross_entropy(model(x), y).backward()
        opt.second_step()  # lr 0: the weights stay, the mask schedule advances
    new, w = flat(mask.masks), flat(weights(model)).abs()
    kept, dropped = old & new, old & ~new
    assert dropped.any() and float(w[dropped].max()) <= float(w[kept].min())


# --------------------------------------------------------- both APIs, resume


def make_masks(model):
    return {
        "random": RandomMask(0.5, update_interval=3, seed=1),
        "dynamic": DynamicSparseMask(0.5, total_steps=8, update_interval=3, seed=1),
        # 12 examples, 5 per update: the third update (step 6, after the resume) wraps around
        "fisher": FisherMask(model, fisher_batches(n_batches=4), F.cross_entropy, num_samples=5, update_interval=3),
    }


@pytest.mark.parametrize("kind", ["random", "dynamic", "fisher"])
def test_closure_and_two_phase_apis_agree_for_every_mask(kind):
    results = []
    for api in ("closure", "two-phase"):
        model = conv_net()
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=make_masks(model)[kind], lr=0.1)
        for t in range(5):
            x, y = image_batch(seed=t, n=8)
            if api == "closure":
                opt.step(lambda model=model, x=x, y=y: _loss(model, x, y))
            else:
                F.cross_entropy(model(x), y).backward()
                opt.first_step()
                F.cross_entropy(model(x), y).backward()
                opt.second_step()
        results.append(weights(model) + list(opt.mask.masks))
    assert_equal_tensors(*results)


def _train(model, opt, steps, offset):
    for t in range(offset, offset + steps):
        x, y = image_batch(seed=t, n=8)
        opt.step(lambda x=x, y=y: _loss(model, x, y))


@pytest.mark.parametrize("kind", ["random", "dynamic", "fisher"])
def test_resume_is_bit_exact_with_masks(kind):
    def fresh():
        model = conv_net()
        opt = samopt.SAM(
            model.parameters(), torch.optim.SGD, rho=0.1, mask=make_masks(model)[kind], lr=0.1, momentum=0.9
        )
        return model, opt

    model, opt = fresh()
    _train(model, opt, 8, 0)  # mask updates at steps 0, 3, 6
    straight = weights(model) + list(opt.mask.masks)

    model, opt = fresh()
    _train(model, opt, 4, 0)
    model, opt = reloaded(*reloaded(model, opt, fresh), fresh)  # saving right after a load keeps the data position too
    _train(model, opt, 4, 4)
    assert_equal_tensors(weights(model) + list(opt.mask.masks), straight)


def test_ssamf_and_ssamd_are_sam_with_the_mask():
    x, y = image_batch(n=8)
    pairs = []
    for conv in (True, False):
        model = conv_net()
        kw = {"rho": 0.1, "lr": 0.1}
        if conv:
            opt = samopt.SSAMF(
                model.parameters(),
                torch.optim.SGD,
                model=model,
                fisher_data=fisher_batches(),
                loss_fn=F.cross_entropy,
                sparsity=0.5,
                num_samples=4,
                update_interval=2,
                **kw,
            )
        else:
            mask = FisherMask(model, fisher_batches(), F.cross_entropy, 0.5, num_samples=4, update_interval=2)
            opt = samopt.SAM(model.parameters(), torch.optim.SGD, mask=mask, **kw)
        for _ in range(3):
            opt.step(lambda model=model: _loss(model, x, y))
        pairs.append(weights(model))
    assert_equal_tensors(*pairs)
    model = conv_net()
    opt = samopt.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.25, total_steps=10, lr=0.1)
    assert isinstance(opt.mask, DynamicSparseMask) and opt.mask.sparsity == 0.25 and opt.mask.total_steps == 10


def test_masks_span_param_groups_and_skip_parameters_without_gradients():
    model = mlp()
    x, y = vector_batch()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.0}]
    mask = RandomMask(0.5, seed=0)
    opt = samopt.SAM(groups, torch.optim.SGD, rho=0.1, mask=mask, lr=0.1)
    model[2].bias.requires_grad_(False)
    F.cross_entropy(model(x), y).backward()
    w = weights(model)
    opt.first_step()
    assert mask.numel == 66 and sum(mask.live) == 33  # one budget over both groups, bias included
    after = weights(model)
    assert torch.equal(after[2], w[2]) and torch.equal(after[3], w[3])  # rho = 0 group and the no-grad bias
    assert not torch.equal(after[0], w[0])
    opt.restore()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a real number in \[0, 1\)"):
        RandomMask(sparsity)


def test_bad_mask_arguments_name_the_argument_and_the_allowed_values():
    model = conv_net()
    data = fisher_batches()
    with pytest.raises(TypeError, match="sparsity must be a real number in"):
        RandomMask("0.5")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        FisherMask(model, data, F.cross_entropy, num_samples=0)
    with pytest.raises(ValueError, match="fisher_labels must be one of 'true', 'sampled'; got 'model'"):
        FisherMask(model, data, F.cross_entropy, fisher_labels="model")
    with pytest.raises(ValueError, match="granularity must be one of 'element', 'tensor'; got 'row'"):
        RandomMask(0.5, granularity="row")
    with pytest.raises(ValueError, match="drop must be one of 'gradient', 'weight', 'random'; got 'magnitude'"):
        DynamicSparseMask(0.5, total_steps=10, drop="magnitude")
    with pytest.raises(ValueError, match="grow must be one of 'random', 'gradient'; got 'weight'"):
        DynamicSparseMask(0.5, total_steps=10, grow="weight")
    with pytest.raises(ValueError, match=r"drop_rate must be a real number in \[0, 1\], got 1.5"):
        DynamicSparseMask(0.5, total_steps=10, drop_rate=1.5)
    with pytest.raises(ValueError, match="update_interval must be None or an integer >= 1, got 0"):
        RandomMask(0.5, update_interval=0)
    with pytest.raises(TypeError, match=r"mask must be a samopt\.masks\.Mask"):
        samopt.SAM(model.parameters(), torch.optim.SGD, mask="fisher", lr=0.1)
    with pytest.raises(TypeError, match=r"seed must be None or an int, got 1\.5"):
        RandomMask(0.5, seed=1.5)
    with pytest.raises(TypeError, match="seed must be None or an int, got True"):
        samopt.DeltaSAM(model.parameters(), seed=True)
    with pytest.raises(TypeError, match="fisher_data must be an iterable"):
        FisherMask(model, 3, F.cross_entropy)


def test_empty_fisher_data_raises_at_the_first_step_and_leaves_weights_at_w():
    model = conv_net()
    opt = samopt.SSAMF(model.parameters(), model=model, fisher_data=[], loss_fn=F.cross_entropy, lr=0.1)
    x, y = image_batch(n=8)
    F.cross_entropy(model(x), y).backward()
    w = weights(model)
    with pytest.raises(ValueError, match="fisher_data yielded no batches"):
        opt.first_step()
    assert_equal_tensors(weights(model), w)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="fisher_data yielded no batches"):
        opt.first_step()  # the failed step left nothing pending


def test_fisher_mask_refuses_parameters_outside_the_model():
    model, other = conv_net(), mlp()
    mask = FisherMask(model, fisher_batches(), F.cross_entropy)
    with pytest.raises(ValueError, match="are not parameters of the model given as model="):
        samopt.SAM(list(model.parameters()) + list(other.parameters()), mask=mask, lr=0.1)


def test_a_mask_serves_one_optimizer():
    a, b = mlp(), mlp()
    mask = RandomMask(0.5)
    first = samopt.SAM(a.parameters(), mask=mask, lr=0.1)
    for params in (b.parameters(), a.parameters()):  # other parameters, or the same ones
        with pytest.raises(ValueError, match="already bound to another optimizer"):
            samopt.SAM(params, mask=mask, lr=0.1)
    assert mask.params == list(first.base_optimizer.param_groups[0]["params"])


def test_mask_density_before_the_first_step_and_without_a_mask():
    model = mlp()
    assert samopt.SAM(model.parameters(), lr=0.1).mask_density() == 1.0
    opt = samopt.SAM(model.parameters(), mask=RandomMask(0.5), lr=0.1)
    with pytest.raises(RuntimeError, match="no mask yet: it is computed at the first first_step"):
        opt.mask_density()


def test_state_dicts_with_and_without_masks_do_not_mix():
    model = mlp()
    plain = samopt.SAM(model.parameters(), lr=0.1)
    masked = samopt.SAM(model.parameters(), mask=RandomMask(0.5), lr=0.1)
    with pytest.raises(ValueError, match="mask entry does not match this optimizer, which has one"):
        masked.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="mask entry does not match this optimizer, which has none"):
        plain.load_state_dict(masked.state_dict())
    dyn = samopt.SAM(model.parameters(), mask=DynamicSparseMask(0.5, total_steps=5), lr=0.1)
    with pytest.raises(ValueError, match="mask state is from a RandomMask, not a DynamicSparseMask"):
        dyn.load_state_dict(masked.state_dict())


def test_an_overflow_skip_does_not_count_and_the_due_mask_update_is_retried():
    model = mlp()
    mask = RandomMask(0.5, update_interval=1, seed=0)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = vector_batch()

    def closure(factor):
        def run():
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss * factor).backward()
            return loss

        return run

    opt.step(closure(1.0), scaler=scaler)
    scaler.update()
    first = [m.clone() for m in mask.masks]
    assert (mask.steps, mask.last_update) == (1, 0)
    with torch.autocast("cpu", dtype=torch.float16):
        opt.step(closure(float("inf")), scaler=scaler)  # skipped: no update, no new mask, no count
    scaler.update()
    assert (mask.steps, mask.last_update) == (1, 0)
    assert_equal_tensors(mask.masks, first)
    opt.step(closure(1.0), scaler=scaler)
    assert (mask.steps, mask.last_update) == (2, 1)
    assert any(not torch.equal(a, b) for a, b in zip(mask.masks, first, strict=True))


def test_a_zero_gradient_step_still_computes_the_mask():
    model = mlp()
    mask = RandomMask(0.5, seed=0)
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1)
    x, _ = vector_batch()
    w = weights(model)
    (model(x).sum() * 0.0).backward()
    opt.first_step()
    assert opt.mask_density() == 0.5
    assert_equal_tensors(weights(model), w)
    (model(x).sum() * 0.0).backward()
    opt.second_step()


def test_add_param_group_recomputes_the_mask_over_all_parameters_from_the_same_stream():
    model = mlp()
    x, y = vector_batch()
    mask = RandomMask(0.5, seed=0)
    opt = samopt.SAM(model[0].parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1)
    opt.step(lambda: _loss(model, x, y))
    first = flat(mask.masks).clone()
    opt.add_param_group({"params": model[2].parameters()})
    assert mask.masks is None and len(mask.params) == 4
    opt.step(lambda: _loss(model, x, y))
    assert sum(mask.live) == keep_count(66, 0.5)
    # the generator went on: a fresh mask with the same seed would redraw the first mask's stream
    assert not torch.equal(flat(mask.masks)[: first.numel()], first)


def test_empty_batches_in_fisher_data_are_refused():
    model = conv_net()
    x, y = image_batch(n=3)
    mask = FisherMask(model, [(x[:0], y[:0])], F.cross_entropy, num_samples=2)
    samopt.SAM(model.parameters(), mask=mask, lr=0.1)
    with pytest.raises(ValueError, match="each batch needs as many targets as inputs, and at least one"):
        mask.samples(2)


class KeywordNet(nn.Module):
    """Takes named inputs and returns an object with ``.logits``, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
        return type("Output", (), {"logits": self.fc(h)})()


@pytest.mark.parametrize("vectorize", [False, True])
def test_fisher_scores_with_named_inputs_equal_a_per_sample_loop(vectorize):
    torch.manual_seed(0)
    model = KeywordNet()
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(0, 20, (10, 5), generator=g), (torch.rand(10, 5, generator=g) > 0.3).long()
    y = torch.randint(0, 3, (10,), generator=g)
    batches = [
        ({"input_ids": ids[:6], "attention_mask": mask[:6]}, y[:6]),
        ({"input_ids": ids[6:], "attention_mask": mask[6:]}, y[6:]),
    ]
    fisher = FisherMask(model, batches, F.cross_entropy, 0.5, num_samples=8, vectorize=vectorize)
    samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=fisher, lr=0.1)  # binds the mask
    scores = fisher.scores(list(model.parameters()))
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(8):  # the first 8 examples, across the two batches
        model.zero_grad()
        F.cross_entropy(model(ids[i : i + 1], mask[i : i + 1]).logits, y[i : i + 1]).backward()
        for e, p in zip(expected, model.parameters(), strict=True):
            e += p.grad.square()
    for s, e in zip(scores, expected, strict=True):
        assert torch.allclose(s, e, atol=1e-6, rtol=1e-5)
    assert fisher.position == 8  # 6 from the first batch, 2 from the second; the rest is carried over
    with pytest.raises(TypeError, match="inputs a tensor or a mapping of tensors"):
        FisherMask(model, [({"input_ids": [1, 2]}, y[:2])], F.cross_entropy, 0.5, num_samples=2)._batch()


class BranchyNet(nn.Module):
    """Python control flow on the data, as Hugging Face attention-mask code has: vmap cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x if bool((x > 0).all()) else x.relu())


def branchy_setup(vectorize):
    torch.manual_seed(0)
    model = BranchyNet()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    fisher = FisherMask(model, batches, F.cross_entropy, 0.5, num_samples=5, vectorize=vectorize, seed=0)
    samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=fisher, lr=0.1)  # binds the mask
    return model, fisher


def test_fisher_vectorize_auto_falls_back_to_the_loop_once_with_a_warning(monkeypatch, recwarn):
    monkeypatch.setattr(samopt.masks, "_vectorize_default", lambda device: True)  # as on CUDA
    model, auto = branchy_setup(None)
    _, loop = branchy_setup(False)
    with pytest.warns(RuntimeWarning, match=r"vmap could not compute per-example gradients .*using the loop"):
        first = auto.scores(list(model.parameters()))
    assert_equal_tensors(first, loop.scores(list(model.parameters())))
    assert auto.position == loop.position == 5
    recwarn.clear()
    second = auto.scores(list(model.parameters()))  # remembers: no second attempt, no second warning
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert_equal_tensors(second, loop.scores(list(model.parameters())))


def test_fisher_vectorize_true_on_a_model_vmap_cannot_run_names_the_way_out():
    model, fisher = branchy_setup(True)
    with pytest.raises(
        RuntimeError, match=r"FisherMask\(vectorize=True\): torch.func.vmap could not .* vectorize=False"
    ):
        fisher.scores(list(model.parameters()))
