"""Per-step cost of samopt's SAM against the plain base optimizer and pytorch_optimizer's SAM.

Each method runs in its own worker process (its own heap and allocator state, as in
a real run); one run interleaves them in time, round by round in rotating order,
so the noise of a shared machine hits all of them alike. Reported: the median time
per step and its ratio to SGD, and each method's peak memory over three steps in a
fresh process (peak resident set on CPU, see ``measure_memory``;
``torch.cuda.max_memory_allocated`` on CUDA) and its excess over SGD's.

Workloads (from issues 2, 17 and 18):
  cnn       small CNN with BatchNorm, batch 128 at 32x32, 10 classes
  mlp       MLP with 10.5M parameters, batch 32
  resnet18  CIFAR ResNet-18 (samopt.train.models), batch 128 at 32x32
  fmnist    the fmnist-noisy recipe's small CNN, batch 128 at 28x28 (1 channel)

Methods beyond SGD and SAM: structured masks whose clean pass skips the gradients of
the tensors they leave unperturbed (``sam-on``, ``ssam-f-tensor``, ``ssam-d-tensor`` at
sparsity 0.5; ``ssam-f-element`` for comparison: an element mask saves nothing), and the
cheaper-SAM policies of issue 17 (``every-5``, ``looksam-5``, ``sub-batch-4``, ``msam``;
with ``--steps`` a multiple of 5 each round holds whole periods), and the published
variants of issue 21 at their defaults (``gsam``, ``friendly-sam``, ``vasso``, ``wsam``). The masks are computed
in the warm-up and not updated while timed.

Usage::

    python benchmarks/step_cost.py                      # both workloads, CPU
    python benchmarks/step_cost.py --allocator glibc    # glibc's default malloc settings
    python benchmarks/step_cost.py --device cuda --rounds 20
    python benchmarks/step_cost.py --workload mlp --steps 5 --rounds 3   # quick look
    python benchmarks/step_cost.py --workload resnet18 --methods sgd,samopt-closure,sam-on,ssam-f-tensor,ssam-d-tensor

With ``--count``, no timing: for each method, after three warm-up steps, one step is
counted by :func:`samopt.profiling.count_ops`: the operators it dispatches and the host
synchronisations among them (``aten._local_scalar_dense``, behind ``.item()``,
``float()`` and ``bool()`` of a tensor, and ``aten.nonzero``); on CUDA the profiler
also counts the kernels launched. This is the overhead above two forward/backward
passes made visible on a CPU (issue 20)::

    python benchmarks/step_cost.py --count --workload cnn --methods sgd,samopt-closure,samopt-two-phase,sam-on

Needs ``pip install pytorch-optimizer==4.1.0`` (the ``bench`` extra) for the peer column.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection

import torch
import torch.nn.functional as F
from torch import nn

import samopt
from samopt.masks import DynamicSparseMask, FisherMask
from samopt.profiling import count_ops
from samopt.seams import Pass
from samopt.sub_batch import SubBatchAscent
from samopt.train import models

#: glibc malloc settings of the timing workers. "caching" keeps freed memory mapped,
#: as PyTorch's CUDA caching allocator (and jemalloc/tcmalloc) do, so that every step
#: does not page-fault its gradients and activations back in; glibc's defaults return
#: large blocks to the system and make CPU step times swing by tens of percent with
#: the allocation history of the process. Tensors above glibc's 32 MiB mmap maximum
#: are still mapped per allocation.
ALLOCATORS = {
    "caching": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
    "glibc": {},
}
#: Pause before each timed run, so the previous worker's OpenMP threads stop spinning.
PAUSE_S = 0.2
METHODS = (
    "sgd",
    "samopt-closure",
    "samopt-two-phase",
    "pytorch_optimizer",
    "sam-on",
    "ssam-f-tensor",
    "ssam-d-tensor",
    "ssam-f-element",
    "every-5",
    "looksam-5",
    "sub-batch-4",
    "msam",
    "gsam",
    "friendly-sam",
    "vasso",
    "wsam",
)
WORKLOADS = ("cnn", "mlp", "resnet18", "fmnist")


def make_model(workload: str) -> nn.Module:
    if workload == "cnn":

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        return nn.Sequential(
            *block(3, 32, 1),
            *block(32, 64, 2),
            *block(64, 128, 2),
            *block(128, 128, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, 10),
        )
    if workload == "mlp":
        return nn.Sequential(
            nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
            nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10),
        )  # fmt: skip
    if workload == "resnet18":
        return models.resnet18()
    if workload == "fmnist":
        return models.small_cnn()
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


def make_batch(workload: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if workload in ("cnn", "resnet18", "fmnist"):
        x = torch.randn(128, *((1, 28, 28) if workload == "fmnist" else (3, 32, 32)), generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
    else:
        x = torch.randn(32, 1024, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
    return x.to(device), y.to(device)


def make_stepper(method: str, workload: str, device: torch.device) -> Callable[[], None]:
    """A function that runs one full training step of ``method``."""
    torch.manual_seed(0)
    model = make_model(workload).to(device)
    x, y = make_batch(workload, device)
    kw = {"lr": 0.01, "momentum": 0.9}

    def loss_backward() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if method == "sgd":  # fused, as SAM builds its base optimizer
        params = list(model.parameters())
        opt = torch.optim.SGD(params, **samopt.sam.fuse_kwargs(torch.optim.SGD, params, kw))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_backward()
            opt.step()

        return step
    if method == "samopt-closure":
        sam = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
        return lambda: sam.step(loss_backward)
    if method == "samopt-two-phase":
        sam = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)

        def step() -> None:
            loss_backward()
            sam.first_step(zero_grad=True)
            loss_backward()
            sam.second_step(zero_grad=True)

        return step
    masks = {
        "sam-on": lambda: samopt.masks.sam_on(model),
        "ssam-f-tensor": lambda: FisherMask(model, [(x[:16], y[:16])], F.cross_entropy, 0.5, num_samples=16,
                                            granularity="tensor", update_interval=None),
        "ssam-d-tensor": lambda: DynamicSparseMask(0.5, total_steps=10**6, update_interval=None, granularity="tensor"),
        "ssam-f-element": lambda: FisherMask(model, [(x[:16], y[:16])], F.cross_entropy, 0.5, num_samples=16,
                                             update_interval=None),
    }  # fmt: skip
    if method in masks:
        sam = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, mask=masks[method](), **kw)
        return lambda: sam.step(loss_backward)
    variants = {  # issue 21, at their defaults (GSAM with rho following the lr)
        "gsam": lambda ps: samopt.GSAM(ps, torch.optim.SGD, rho=0.05, rho_min=0.01, **kw),
        "friendly-sam": lambda ps: samopt.FriendlySAM(ps, torch.optim.SGD, rho=0.05, **kw),
        "vasso": lambda ps: samopt.VaSSO(ps, torch.optim.SGD, rho=0.05, **kw),
        "wsam": lambda ps: samopt.WSAM(ps, torch.optim.SGD, rho=0.05, **kw),
    }
    if method in variants:
        sam = variants[method](model.parameters())
        return lambda: sam.step(loss_backward)
    if method == "every-5":
        sam = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, schedule=samopt.schedules.EveryK(5), **kw)
        return lambda: sam.step(loss_backward)
    if method == "looksam-5":
        sam = samopt.LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, **kw)
        return lambda: sam.step(loss_backward)
    if method == "sub-batch-4":
        sam = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, ascent=SubBatchAscent(4), **kw)

        def sub_batch_pass(p: Pass) -> torch.Tensor:
            xb, yb = p.take(x, y)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        return lambda: sam.step(sub_batch_pass)
    if method == "msam":
        msam = samopt.MSAM(model.parameters(), torch.optim.SGD, rho=1.0, **kw)

        def step() -> None:
            msam.zero_grad(set_to_none=True)
            loss_backward()
            msam.step()

        return step
    if method == "pytorch_optimizer":
        from pytorch_optimizer import SAM as PeerSAM

        peer = PeerSAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)

        def step() -> None:
            loss_backward()
            peer.first_step(zero_grad=True)
            loss_backward()
            peer.second_step(zero_grad=True)

        return step
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations, or the resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def worker(conn: Connection, method: str, workload: str, device_name: str, threads: int) -> None:
    """One method in its own process (own heap, like a real run): time ``n`` steps on request."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    step = make_stepper(method, workload, device)
    for _ in range(3):  # warm-up: allocator, kernels, lazy optimizer state
        step()
    sync(device)
    conn.send("ready")
    while (n := conn.recv()) > 0:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        conn.send((time.perf_counter() - t0) / n)
    conn.send(peak_mib(device))


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started inside the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def _spawn(
    methods: list[str], workload: str, device: str, env: dict[str, str]
) -> dict[str, tuple[Connection, mp.Process]]:
    ctx = mp.get_context("spawn")
    workers = {}
    with environment(env):  # glibc reads MALLOC_* when a worker starts
        for m in methods:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, m, workload, device, torch.get_num_threads()))
            proc.start()
            workers[m] = (parent, proc)
    for parent, _ in workers.values():
        if parent.recv() != "ready":
            raise RuntimeError("benchmark worker failed to start")
    return workers


def _finish(workers: dict[str, tuple[Connection, mp.Process]]) -> dict[str, float]:
    peaks = {}
    for m, (conn, proc) in workers.items():
        conn.send(0)
        peaks[m] = conn.recv()
        proc.join()
    return peaks


def measure_time(
    methods: list[str], workload: str, device: str, steps: int, rounds: int, allocator: str
) -> dict[str, list[float]]:
    """Seconds per step of each method, one entry per round.

    Each method runs in its own process; the rounds interleave them in time (one
    process works while the others wait), rotating the order so that no method
    follows itself, with a pause before each run so the previous worker's threads
    are idle; machine noise thus hits all methods alike. ``allocator`` is a key of
    :data:`ALLOCATORS`.
    """
    workers = _spawn(methods, workload, device, ALLOCATORS[allocator])
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:  # rotate: no method ever runs twice in a row
            time.sleep(PAUSE_S)
            conn = workers[m][0]
            conn.send(steps)
            times[m].append(conn.recv())
    _finish(workers)
    return times


def measure_memory(methods: list[str], workload: str, device: str) -> dict[str, float]:
    """Peak memory in MiB of each method over its warm-up steps, each in a fresh process.

    On CPU the workers run with glibc's mmap threshold fixed at 64 KiB, so every large
    tensor is returned to the system when freed and the peak resident set tracks the
    peak of live tensors (the default, adaptive threshold keeps freed blocks mapped,
    which makes the peak depend on allocation history). Timing workers keep the default.
    """
    return _finish(_spawn(methods, workload, device, {"MALLOC_MMAP_THRESHOLD_": "65536"}))


def count_step(method: str, workload: str, device: torch.device) -> dict[str, object]:
    """Operators, host synchronisations (by operator) and, on CUDA, kernel launches of one warmed-up step."""
    step = make_stepper(method, workload, device)
    for _ in range(3):  # masks computed, optimizer state allocated
        step()
    counted = count_ops(step)
    result: dict[str, object] = {"ops": counted.ops, "syncs": counted.syncs, "by_op": counted.by_op}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        result["kernels"] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all", help="all: cnn and mlp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--methods", default=",".join(METHODS[:4]), help=f"comma-separated subset of {METHODS}")
    parser.add_argument(
        "--allocator", choices=sorted(ALLOCATORS), default="caching", help="malloc settings of the timing workers"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--count", action="store_true", help="count operators and host syncs per step; no timing")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    workloads = ["cnn", "mlp"] if args.workload == "all" else [args.workload]
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, device {args.device}, threads {threads}, samopt {samopt.__version__}, "
        f"allocator {args.allocator}"
    )
    results: dict[str, object] = {}
    if args.count:
        for wl in workloads:
            print(f"\n### {wl}: one step after three warm-up steps\n")
            print("| method | operators | host syncs | of which | CUDA kernels |")
            print("|---|---|---|---|---|")
            counts = {m: count_step(m, wl, torch.device(args.device)) for m in methods}
            for m, c in counts.items():
                by = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in c["by_op"].items()) or "-"
                print(f"| {m} | {c['ops']} | {c['syncs']} | {by} | {c.get('kernels', 'n/a')} |")
            results[wl] = counts
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    for wl in workloads:
        n_params = sum(p.numel() for p in make_model(wl).parameters())
        times = measure_time(methods, wl, args.device, args.steps, args.rounds, args.allocator)
        mem = measure_memory(methods, wl, args.device)
        med = {m: statistics.median(t) for m, t in times.items()}
        print(f"\n### {wl}: {n_params / 1e6:.2f}M parameters ({args.rounds} rounds x {args.steps} steps)\n")
        print("| method | ms/step (median) | x SGD | peak memory MiB | memory - SGD MiB |")
        print("|---|---|---|---|---|")
        for m in methods:
            ratio = med[m] / med["sgd"] if "sgd" in med else float("nan")
            extra = mem[m] - mem["sgd"] if "sgd" in mem else float("nan")
            print(f"| {m} | {med[m] * 1e3:.2f} | {ratio:.2f} | {mem[m]:.0f} | {extra:+.0f} |")
        results[wl] = {"params": n_params, "median_s": med, "all_s": times, "peak_mib": mem}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
