"""samopt under torch.distributed: 2 CPU ranks with gloo, spawned by each test, against one-process references."""

import faulthandler
import gc
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import mlp, seeded
from torch.nn.parallel import DistributedDataParallel

import samopt
from samopt import distributed as D
from samopt.delta import delta_weights
from samopt.masks import DynamicSparseMask, FisherMask, SelectMask
from samopt.seams import Pass
from samopt.sub_batch import SubBatchAscent
from samopt.train import loop
from samopt.train.config import TrainConfig
from samopt.train.launch import Ranks, Shard

WORLD = 2
SYNCS = ("global", "local")
STEPS = 4
LR, RHO = 0.1, 0.2


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """8 full batches of 8 examples; rank ``r`` of 2 trains on rows ``4r:4r+4`` of each."""
    g = seeded(7)
    return torch.randn(8, 8, 5, generator=g), torch.randint(0, 3, (8, 8), generator=g)


def fisher_pool(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s own Fisher examples: 3 batches of 4."""
    g = seeded(20 + rank)
    return [(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]


def interleaved_pool() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One process's Fisher data seeing, per update, what each rank sees: rank 0's batch k, rank 1's batch k, ..."""
    pools = [fisher_pool(r) for r in range(WORLD)]
    return [pools[r][k] for k in range(3) for r in range(WORLD)]


#: The published variants, with settings that make their state and schedules matter.
VARIANTS = {
    "gsam": lambda ps, **kw: samopt.GSAM(ps, torch.optim.SGD, RHO, alpha=0.3, rho_min=0.01, lr=LR, **kw),
    "friendly-sam": lambda ps, **kw: samopt.FriendlySAM(ps, torch.optim.SGD, RHO, lmbda=0.6, lr=LR, **kw),
    "vasso": lambda ps, **kw: samopt.VaSSO(ps, torch.optim.SGD, RHO, theta=0.5, lr=LR, **kw),
    "wsam": lambda ps, **kw: samopt.WSAM(ps, torch.optim.SGD, RHO, gamma=0.8, lr=LR, momentum=0.9, **kw),
}


def build(method: str, model: torch.nn.Module, fisher_data, num_samples: int, **kw) -> samopt.SAM:
    """The optimizer under test; SSAM-D's seed comes from the global seed (``torch.initial_seed()``)."""
    if method in VARIANTS:
        return VARIANTS[method](model.parameters(), **kw)
    if method == "sam":
        return samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, **kw)
    if method == "ssamf":
        mask = FisherMask(model, fisher_data, F.cross_entropy, 0.5, num_samples=num_samples, update_interval=2)
    else:
        mask = DynamicSparseMask(0.5, total_steps=8, update_interval=1, drop="gradient", grow="random")
    return samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, mask=mask, **kw)


def sam_steps(opt: samopt.SAM, model: torch.nn.Module, batches) -> None:
    for x, y in batches:

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def rank_batches(rank: int, steps: range = range(STEPS)):
    x, y = data()
    return [(x[k, 4 * rank : 4 * rank + 4], y[k, 4 * rank : 4 * rank + 4]) for k in steps]


def full_batches(steps: range = range(STEPS)):
    x, y = data()
    return [(x[k], y[k]) for k in steps]


# ---------------------------------------------------------------------------------- the ranks


def _worker(rank: int, case: str, out: str) -> None:
    faulthandler.enable()  # a crash of a rank prints its Python stack into the test's output
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # ranks seeded apart, as training scripts do (seed + rank)
        result = CASES[case](rank, out)
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        # the DDP wrappers are reference cycles holding the group: free them now, so that the group is torn down
        # here and not at interpreter exit (where gloo aborted a rank now and then after a clean run)
        gc.collect()
        dist.destroy_process_group()


def _run(method: str, sync: str, wrap: str, rank: int, steps: int = STEPS):
    model = mlp()
    torch.manual_seed(100 + rank)
    net = DistributedDataParallel(model) if wrap == "ddp" else model
    wrapping = {"ddp": net} if wrap == "ddp" else {"average_grads": True}  # plain: samopt averages
    opt = build(method, net, fisher_pool(rank), 4, sync=sync, **wrapping)
    sam_steps(opt, net, rank_batches(rank, range(steps)))
    masks = None if opt.mask is None else [m.clone() for m in opt.mask.masks]
    return model, opt, masks


def _case_global(rank: int, out: str) -> dict:
    res = {}
    for method in ("sam", "ssamf", "ssamd"):
        for wrap in ("ddp", "plain"):
            model, _, masks = _run(method, "global", wrap, rank)
            res[method, wrap] = ([p.detach().clone() for p in model.parameters()], masks)
    return res


def _case_variants(rank: int, out: str) -> dict:
    return {
        method: [p.detach().clone() for p in _run(method, "global", "ddp", rank)[0].parameters()] for method in VARIANTS
    }


def _case_local(rank: int, out: str) -> dict:
    res = {}
    for wrap in ("ddp", "plain"):
        model, _, _ = _run("sam", "local", wrap, rank, steps=3)
        res["sam", wrap] = [p.detach().clone() for p in model.parameters()]
    for method in ("ssamf", "ssamd"):  # the gradients (and Fisher data) differ across ranks: the masks must not
        model, opt, masks = _run(method, "local", "plain", rank, steps=1)
        history = [masks]
        for k in range(1, 7):
            sam_steps(opt, model, rank_batches(rank, range(k, k + 1)))
            history.append([m.clone() for m in opt.mask.masks])
        res[method] = history
    return res


def _case_resume(rank: int, out: str) -> dict:
    model, opt, _ = _run("ssamd", "global", "plain", rank, steps=3)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{out}/ckpt.pt")
    return {}


def _case_delta(rank: int, out: str) -> dict:
    res = {}
    for sync in SYNCS:
        model = mlp()
        net = DistributedDataParallel(model)
        opt = samopt.DeltaSAM(
            net.parameters(), torch.optim.SGD, rho=RHO, estimator="logit", alpha=1.0, sync=sync, ddp=net, lr=LR
        )  # fmt: skip
        (x, y), = rank_batches(rank, range(1))  # fmt: skip

        def closure(net=net, x=x, y=y):
            logits = net(x)
            return F.cross_entropy(logits, y, reduction="none"), logits

        opt.step(closure)
        res[sync] = {"weights": [p.detach().clone() for p in model.parameters()], "lambda": opt.last_weights.clone()}
    model = mlp()  # sync="local" without ddp= or average_grads=True: refused on every rank, nobody waits
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, sync="local", lr=LR)
    try:
        sam_steps(opt, model, rank_batches(rank, range(1)))
    except ValueError as e:
        res["error"] = str(e)
    return res


#: SAM variants run over FSDP: keyword arguments of samopt.SAM.
FSDP_VARIANTS = {"sam": {}, "asam": {"adaptive": True}, "clip": {"max_grad_norm": 0.05}}


def fsdp_model() -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp()  # Linear(5, 7): 7 rows over 2 ranks, so the shards are uneven (4 + 3) and padded
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _case_fsdp(rank: int, out: str) -> dict:
    res = {}
    for name, kw in FSDP_VARIANTS.items():
        model = fsdp_model()
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, **kw)
        sam_steps(opt, model, rank_batches(rank))
        res[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
    errors = []
    for kw in ({"sync": "local"}, {"mask": samopt.masks.RandomMask(0.5)}):
        try:
            samopt.SAM(fsdp_model().parameters(), torch.optim.SGD, lr=LR, **kw)
        except ValueError as e:
            errors.append(str(e))
    res["errors"] = errors
    return res


def adaptive() -> samopt.schedules.AdaptiveAscent:
    return samopt.schedules.AdaptiveAscent(8, lambda1=0.0, lambda2=0.0, decay=0.5)


def scheduled_steps(opt: samopt.SAM, model: torch.nn.Module, batches) -> list[bool]:
    """``sam_steps``, returning whether each step ascended (from the optimizer's own count)."""
    decisions = []
    for batch in batches:
        before = opt.work.ascents
        sam_steps(opt, model, [batch])
        decisions.append(opt.work.ascents > before)
    return decisions


def _case_schedules(rank: int, out: str) -> dict:
    res = {}
    for sync in SYNCS:
        model = mlp()
        net = DistributedDataParallel(model)
        opt = samopt.SAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR, schedule=adaptive(), sync=sync, ddp=net)
        decisions = scheduled_steps(opt, net, rank_batches(rank, range(8)))
        res[sync] = ([p.detach().clone() for p in model.parameters()], decisions, opt.schedule.state_dict())
    model = mlp()
    net = DistributedDataParallel(model)
    opt = samopt.LookSAM(net.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR, ddp=net)
    sam_steps(opt, net, rank_batches(rank, range(8)))
    res["looksam"] = [p.detach().clone() for p in model.parameters()]
    model = mlp()
    net = DistributedDataParallel(model)
    msam = samopt.MSAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    msam_steps(msam, net, rank_batches(rank, range(8)))
    with msam.true_weights():
        res["msam"] = [p.detach().clone() for p in model.parameters()]
    model = mlp()
    net = DistributedDataParallel(model)
    opt = samopt.SAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR, ascent=SubBatchAscent(2), ddp=net)
    res["sub-batch"] = (sub_batch_steps(opt, net, rank_batches(rank)), [p.detach().clone() for p in model.parameters()])
    return res


def sub_batch_steps(opt: samopt.SAM, model: torch.nn.Module, batches, clean_rows=None) -> list[tuple[str, int]]:
    """``sam_steps`` with a closure that takes the pass: the clean pass on ``p.take`` of the batch, or on
    ``clean_rows`` of it where given; returns the (kind, rows) of every pass."""
    seen = []
    for x, y in batches:

        def closure(p: Pass, x=x, y=y):
            xb, yb = p.take(x, y) if clean_rows is None or p.kind == "perturbed" else (x[clean_rows], y[clean_rows])
            seen.append((p.kind, len(xb)))
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    return seen


def last_layer(model: torch.nn.Sequential) -> SelectMask:
    """A tensor mask on the last layer: from the second step the clean pass computes no other gradient."""
    return SelectMask(model, lambda module, name: module is model[-1])


def _case_structured(rank: int, out: str) -> dict:
    res = {}
    for wrap in ("ddp", "plain"):
        model = mlp()
        net = DistributedDataParallel(model) if wrap == "ddp" else model
        wrapping = {"ddp": net} if wrap == "ddp" else {"average_grads": True}
        opt = samopt.SAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR, mask=last_layer(model), **wrapping)
        sam_steps(opt, net, rank_batches(rank))
        res[wrap] = [p.detach().clone() for p in model.parameters()]
    model = mlp()  # nothing says who averages: DDP's reducer would wait for the skipped gradients
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, mask=last_layer(model))
    try:  # refused at the first step (whose mask is due and skips nothing), before any update
        sam_steps(opt, model, rank_batches(rank, range(1)))
    except RuntimeError as e:
        res["error"] = (str(e), [p.detach().clone() for p in model.parameters()])
    return res


def msam_steps(opt: samopt.MSAM, model: torch.nn.Module, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


CASES = {
    "global": _case_global,
    "variants": _case_variants,
    "schedules": _case_schedules,
    "structured": _case_structured,
    "local": _case_local,
    "resume": _case_resume,
    "delta": _case_delta,
    "fsdp": _case_fsdp,
}


def spawn(case: str, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(case, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------------- the tests


def one_process(method: str, steps: int = STEPS) -> tuple[torch.nn.Module, samopt.SAM]:
    """The same training in one process over the concatenated batches (SSAM-D seeded as rank 0 is)."""
    model = mlp()
    torch.manual_seed(100)
    opt = build(method, model, interleaved_pool(), 8)
    sam_steps(opt, model, full_batches(range(steps)))
    return model, opt


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_sync_global_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    ranks = spawn("global", tmp_path)
    for method in ("sam", "ssamf", "ssamd"):
        model, opt = one_process(method)
        for wrap in ("ddp", "plain"):
            for r in ranks:
                weights, masks = r[method, wrap]
                close(weights, [p.detach() for p in model.parameters()])
                if masks is not None:
                    assert all(torch.equal(a, b) for a, b in zip(masks, opt.mask.masks, strict=True)), (method, wrap)
        assert not torch.equal(next(model.parameters()), mlp()[0].weight)  # it trained


def test_the_published_variants_on_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    ranks = spawn("variants", tmp_path)
    for method in VARIANTS:
        model, _ = one_process(method)
        for r in ranks:
            close(r[method], [p.detach() for p in model.parameters()])
        assert not torch.equal(next(model.parameters()), mlp()[0].weight)  # it trained


def test_sam_over_fsdp_sharded_parameters_equals_one_process(tmp_path):
    ranks = spawn("fsdp", tmp_path)
    for name, kw in FSDP_VARIANTS.items():
        model = mlp()
        opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, **kw)
        sam_steps(opt, model, full_batches())
        for r in ranks:
            close(r[name], [p.detach() for p in model.parameters()])
    for r in ranks:
        assert "sync='local' needs each rank's own full gradient" in r["errors"][0]
        assert "masks over FSDP-sharded parameters are not supported" in r["errors"][1]


def hand_local_sam(steps: int) -> list[torch.Tensor]:
    """sync="local" by hand: each rank's own e from its own gradient, the descent gradients averaged."""
    w = [p.detach().clone() for p in mlp().parameters()]
    for k in range(steps):
        descent = [torch.zeros_like(t) for t in w]
        for r in range(WORLD):
            (x, y), = rank_batches(r, range(k, k + 1))  # fmt: skip
            model = mlp()
            with torch.no_grad():
                for p, t in zip(model.parameters(), w, strict=True):
                    p.copy_(t)
            g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in g))
            with torch.no_grad():
                for p, gi in zip(model.parameters(), g, strict=True):
                    p.add_(gi, alpha=RHO / norm)
            h = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
            descent = [d + hi / WORLD for d, hi in zip(descent, h, strict=True)]
        w = [t - LR * d for t, d in zip(w, descent, strict=True)]
    return w


def test_sync_local_averages_each_ranks_own_sam_gradient_and_masks_agree_across_ranks(tmp_path):
    ranks = spawn("local", tmp_path)
    expected = hand_local_sam(3)
    for wrap in ("ddp", "plain"):  # DDP: pass 1 under no_sync(); plain: samopt averages only pass 2
        for r in ranks:
            close(r["sam", wrap], expected)
    global_w = [p.detach() for p in one_process("sam", 3)[0].parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(expected, global_w, strict=True)) > 1e-4  # not global
    for method in ("ssamf", "ssamd"):
        a, b = ranks[0][method], ranks[1][method]
        assert len(a) == 7
        for ma, mb in zip(a, b, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(ma, mb, strict=True)), method
        assert any(not torch.equal(x, y) for x, y in zip(a[0], a[-1], strict=True)), method  # masks did change


def test_every_rank_takes_the_same_ascent_decisions(tmp_path):
    ranks = spawn("schedules", tmp_path)
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, schedule=adaptive())
    reference = scheduled_steps(opt, model, full_batches(range(8)))
    assert 0 < sum(reference) < 8  # the rule chose both kinds of step
    for r in ranks:  # global: the averaged gradient's norm is the concatenated batch's, the decisions and weights too
        weights, decisions, stats = r["global"]
        assert decisions == reference
        close(weights, [p.detach() for p in model.parameters()])
        assert stats == pytest.approx(opt.schedule.state_dict(), rel=1e-5)
    a, b = ranks[0]["local"], ranks[1]["local"]  # local: each rank's own statistics, one decision for both
    assert a[1] == b[1] and a[2] != b[2]
    close(a[0], b[0])
    model = mlp()  # LookSAM's cached direction from the averaged gradients: the one-process run's
    sam_steps(samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR), model, full_batches(range(8)))
    for r in ranks:
        close(r["looksam"], [p.detach() for p in model.parameters()])
    model = mlp()  # MSAM: the momentum of the averaged gradients, the same perturbation on every rank
    msam = samopt.MSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    msam_steps(msam, model, full_batches(range(8)))
    with msam.true_weights():
        for r in ranks:
            close(r["msam"], [p.detach() for p in model.parameters()])
    # Sub-batch ascent: each rank's clean pass on the first half of its own 4 rows, averaged over the ranks: the
    # clean gradient of rows 0, 1 (rank 0) and 4, 5 (rank 1) of the concatenated batch, the update from all 8.
    model = mlp()
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, ascent=SubBatchAscent(2))
    reference = sub_batch_steps(opt, model, full_batches(), clean_rows=[0, 1, 4, 5])
    assert reference == [("clean", 4), ("perturbed", 8)] * STEPS
    for r in ranks:
        seen, weights = r["sub-batch"]
        assert seen == [("clean", 2), ("perturbed", 4)] * STEPS
        close(weights, [p.detach() for p in model.parameters()])
    model = mlp()  # and not SAM's clean pass on the whole batch
    sam_steps(samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR), model, full_batches())
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(weights, model.parameters(), strict=True)) > 1e-4


def test_a_tensor_mask_skips_on_two_ranks_and_equals_one_process_on_the_concatenated_batch(tmp_path):
    ranks = spawn("structured", tmp_path)
    model = mlp()
    sam_steps(samopt.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, mask=last_layer(model)), model,
              full_batches())  # fmt: skip
    for r in ranks:  # DDP: the clean pass under no_sync(), samopt averages the last layer's gradients
        close(r["ddp"], [p.detach() for p in model.parameters()])
        close(r["plain"], [p.detach() for p in model.parameters()])
        message, weights = r["error"]
        assert "skips the clean gradients of the tensors it does not perturb" in message and "pass ddp=" in message
        assert "average_grads=True" in message and "skip_unperturbed=False" in message
        close(weights, [p.detach() for p in mlp().parameters()])  # no update was applied


def test_a_two_rank_checkpoint_resumes_on_one_process(tmp_path):
    spawn("resume", tmp_path)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model = mlp()
    model.load_state_dict(ckpt["model"])
    torch.manual_seed(5)  # another seed: the mask's generator state comes from the checkpoint
    opt = build("ssamd", model, None, 8)
    opt.load_state_dict(ckpt["opt"])
    sam_steps(opt, model, full_batches(range(3, 6)))
    ref_model, ref_opt = one_process("ssamd", steps=6)
    close([p.detach() for p in model.parameters()], [p.detach() for p in ref_model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(opt.mask.masks, ref_opt.mask.masks, strict=True))


def hand_delta_sam(rank_results: list[dict], sync: str) -> list[torch.Tensor]:
    """One δ-SAM step by hand: each rank's weights from its own batch; the ascent gradients averaged over the
    ranks (global) or each rank's own (local); the descent gradients at each rank's w + e averaged."""
    w0 = [p.detach() for p in mlp().parameters()]
    ascents, descent = [], [torch.zeros_like(t) for t in w0]
    for r, res in enumerate(rank_results):
        model = mlp()
        (x, y), = rank_batches(r, range(1))  # fmt: skip
        logits = model(x)
        norms = (logits.softmax(-1) - F.one_hot(y, 3)).norm(dim=-1)  # the logit estimator's s_i
        lam = delta_weights(norms.detach(), 1.0)
        torch.testing.assert_close(res[sync]["lambda"], lam, rtol=0, atol=1e-7)  # from this rank's batch alone
        g = torch.autograd.grad((lam * F.cross_entropy(logits, y, reduction="none")).sum(), list(model.parameters()))
        ascents.append(g)
    if sync == "global":
        ascents = [[sum(a[i] for a in ascents) / WORLD for i in range(len(w0))]] * WORLD
    for r, a in enumerate(ascents):
        model = mlp()
        norm = math.sqrt(sum(float(t.double().square().sum()) for t in a))
        with torch.no_grad():
            for p, t in zip(model.parameters(), a, strict=True):
                p.add_(t, alpha=RHO / norm)
        (x, y), = rank_batches(r, range(1))  # fmt: skip
        h = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        descent = [d + hi / WORLD for d, hi in zip(descent, h, strict=True)]
    return [w - LR * d for w, d in zip(w0, descent, strict=True)]


def test_delta_sam_weights_come_from_each_ranks_own_batch(tmp_path):
    ranks = spawn("delta", tmp_path)
    for sync in SYNCS:
        expected = hand_delta_sam(ranks, sync)
        for res in ranks:
            close(res[sync]["weights"], expected)
    a, b = (hand_delta_sam(ranks, s) for s in SYNCS)
    assert max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) > 1e-4  # the modes differ
    for res in ranks:
        assert "sync='local' on several ranks needs ddp=" in res["error"]


def test_collectives_are_no_ops_in_one_process_and_bad_arguments_are_named():
    t = torch.arange(3.0)
    D.all_reduce_([t], "mean")
    assert torch.equal(t, torch.arange(3.0)) and D.world_size() == 1 and D.rank() == 0
    with pytest.raises(ValueError, match="op must be one of 'mean', 'sum', 'max'; got 'avg'"):
        D.all_reduce_([t], "avg")
    model = mlp()
    with pytest.raises(ValueError, match="sync must be one of 'global', 'local'; got 'm'"):
        samopt.SAM(model.parameters(), torch.optim.SGD, sync="m", lr=0.1)
    with pytest.raises(TypeError, match=r"ddp must be the torch\.nn\.parallel\.DistributedDataParallel wrapper"):
        samopt.SAM(model.parameters(), torch.optim.SGD, ddp=model, lr=0.1)
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed\.ProcessGroup or None"):
        samopt.SAM(model.parameters(), torch.optim.SGD, process_group=0, lr=0.1)


# ------------------------------------------------------------------- samopt train under torchrun


# the run of the 2-rank application test: SSAM-F on labels with 25% noise (the same noisy labels on every rank)
APP = {"optimizer": "ssam-f", "label_noise": 0.25}


def _app_worker(rank: int, out: str, port: int, stop: int, resume: bool = False) -> None:
    """What ``torchrun --nproc_per_node 2 samopt train ...`` runs on rank ``rank``; rank 1 gets a Ctrl-C at ``stop``."""
    faulthandler.enable()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tests.test_app import _interrupt_at, tiny

    if rank == 1 and stop:
        _interrupt_at(pytest.MonkeyPatch(), stop)  # this process ends with the run: nothing to undo
    try:
        summary = loop.run(tiny(Path(out), resume=resume, **APP))
        code = 0
    except SystemExit as e:
        summary, code = None, e.code
    torch.save({"summary": summary, "code": code}, f"{out}/rank{rank}.pt")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "run" / "checkpoint.pt", weights_only=True)["model"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_samopt_train_on_two_ranks_stops_together_and_resumes_on_one(tmp_path):
    from tests.test_app import tiny

    whole, cut, cut2 = tmp_path / "whole", tmp_path / "cut", tmp_path / "cut2"
    for out, stop in ((whole, 0), (cut, 6), (cut2, 6)):
        out.mkdir()
        mp.spawn(_app_worker, args=(str(out), _free_port(), stop), nprocs=WORLD, join=True)
    ranks = [torch.load(whole / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert ranks[0]["summary"]["ranks"] == 2 and ranks[0]["summary"]["history"] == ranks[1]["summary"]["history"]
    # a Ctrl-C on rank 1 only: both ranks finish that step, rank 0 saves, both exit with 130
    assert [torch.load(cut / f"rank{r}.pt", weights_only=False)["code"] for r in range(WORLD)] == [130, 130]
    saved = torch.load(cut / "run" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2) and len(saved["rng_ranks"]) == 2
    assert sorted(p.name for p in (cut / "run").iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    # the 2-rank runs agree up to the interrupt; one process continues at global batch 6 of 8
    real, steps = loop.train_step, [0]

    def counted(*args, **kwargs):
        steps[0] += 1
        return real(*args, **kwargs)

    loop.train_step = counted
    try:
        resumed = loop.run(tiny(cut, resume=True, **APP))
    finally:
        loop.train_step = real
    assert steps[0] == 2 and resumed["ranks"] == 1
    untimed = [_untimed(r["history"][0]) for r in (resumed, ranks[0]["summary"])]
    assert untimed[0] == untimed[1]
    assert [r["epoch"] for r in resumed["history"]] == [1, 2] and math.isfinite(resumed["history"][1]["train_loss"])
    assert 0 <= resumed["history"][1]["flipped_acc_noisy"] <= 1  # the noisy labels' memorisation is reported
    # on 2 ranks again, the interrupted run continues exactly as the uninterrupted one (per-rank RNG restored,
    # the interrupted epoch's saved tally counted once)
    mp.spawn(_app_worker, args=(str(cut2), _free_port(), 0, True), nprocs=WORLD, join=True)
    again = torch.load(cut2 / "rank0.pt", weights_only=False)["summary"]
    for a, b in zip(again["history"], ranks[0]["summary"]["history"], strict=True):
        assert _untimed(a) == _untimed(b)
    w_again, w_whole = _weights(cut2), _weights(whole)
    assert all(torch.equal(w_again[k], w_whole[k]) for k in w_whole)


def _untimed(record):
    """An epoch's record without what the clock and the machine decide: its wall and CPU time and the load."""
    return {k: v for k, v in record.items() if not k.endswith("seconds") and k != "train_load_average"}


def test_batches_are_split_evenly_over_the_ranks():
    class Batches:
        def __len__(self):
            return 2

        def epoch(self, epoch, start=0):
            for k in range(start, 2):
                yield torch.arange(6) + 10 * k, torch.arange(6)

    shard = Shard(Batches(), Ranks(rank=1, world=2))
    assert len(shard) == 2
    assert [x.tolist() for x, _ in shard.epoch(0)] == [[3, 4, 5], [13, 14, 15]]
    assert [x.tolist() for x, _ in shard.epoch(0, start=1)] == [[13, 14, 15]]
    with pytest.raises(ValueError, match="a batch of 6 examples cannot be split over 4 ranks"):
        list(Shard(Batches(), Ranks(rank=0, world=4)).epoch(0))
    cfg = TrainConfig(optimizer="ssam-f", batch_size=64, num_samples=6)
    with pytest.raises(ValueError, match=r"num_samples \(6\) must be a multiple of the number of ranks \(4\)"):
        loop._run(cfg, Ranks(rank=0, world=4), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"batch_size \(66\) must be a multiple of the number of ranks \(4\)"):
        loop._run(TrainConfig(batch_size=66, num_samples=6), Ranks(rank=0, world=4), torch.device("cpu"))
