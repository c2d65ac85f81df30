"""Sparse SAM on real data: SGD, SAM, SSAM-F, SSAM-D and a random mask on Fashion-MNIST.

Trains :func:`samopt.train.models.small_cnn` on the 60k Fashion-MNIST training
images (random-crop with 2-pixel padding and horizontal flips) and reports, over
several seeds, the test accuracy after the last epoch (mean, standard deviation,
range), the time per training step relative to SGD (methods take turns of 20 steps
within each seed, in rotating order, so that machine noise hits them alike) and the time spent in
mask updates. All SAM variants share ``rho``; the masked ones use ``sparsity`` 0.5
and update their masks once per epoch (the official code's setting).

Usage::

    python benchmarks/sparse_fmnist.py                       # 3 seeds x 4 epochs, all methods
    python benchmarks/sparse_fmnist.py --seeds 5 --epochs 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import samopt
from samopt.masks import DynamicSparseMask, FisherMask, RandomMask
from samopt.train.data import fashion_mnist
from samopt.train.models import small_cnn

METHODS = ("sgd", "sam", "ssam-f", "ssam-d", "random-mask")
#: Steps each method takes before the next one gets its turn.
SLICE = 20
MEAN, STD = 0.2860, 0.3530


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 2) and horizontal flip, per image."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    i = torch.randint(0, 5, (n,), generator=g)
    j = torch.randint(0, 5, (n,), generator=g)
    rows = (i[:, None] + torch.arange(28))[:, None, :, None]
    cols = (j[:, None] + torch.arange(28))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class Run:
    """One method at one seed: model, optimizer, data order, timings."""

    def __init__(self, method: str, seed: int, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> None:
        self.method, self.data, self.args = method, data, args
        torch.manual_seed(seed)
        self.model = small_cnn(num_classes=10, in_channels=1)
        self.gen = torch.Generator().manual_seed(seed)
        n = data["x"].shape[0]
        self.steps_per_epoch = n // args.batch_size
        total = self.steps_per_epoch * args.epochs
        base = {"lr": args.lr, "momentum": 0.9, "weight_decay": args.weight_decay}
        params = self.model.parameters()
        self.mask_time, self.mask_updates = 0.0, 0
        if method == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, **base)
        else:
            mask = self._mask(method, seed, total)
            self.opt = samopt.SAM(params, torch.optim.SGD, rho=args.rho, mask=mask, **base)
            if mask is not None:
                self._time_mask(mask)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total)
        self.step_time, self.steps = 0.0, 0

    def _mask(self, method: str, seed: int, total: int) -> samopt.masks.Mask | None:
        s, every = self.args.sparsity, self.steps_per_epoch
        if method == "ssam-f":
            g = torch.Generator().manual_seed(seed + 1000)
            fisher = _batches(self.data, self.args.batch_size, g, augmented=True)
            return FisherMask(
                self.model,
                fisher,
                F.cross_entropy,
                s,
                num_samples=self.args.num_samples,
                update_interval=every,
                seed=seed,
            )
        if method == "ssam-d":
            return DynamicSparseMask(s, total_steps=total, update_interval=every, seed=seed)
        if method == "random-mask":
            return RandomMask(s, seed=seed)
        return None

    def _time_mask(self, mask: samopt.masks.Mask) -> None:
        compute = mask.compute

        def timed(*a: Any) -> Any:
            t0 = time.perf_counter()
            out = compute(*a)
            self.mask_time += time.perf_counter() - t0
            self.mask_updates += 1
            return out

        mask.compute = timed  # type: ignore[method-assign]

    def batches(self) -> Any:
        """All training batches of the run, epoch after epoch."""
        for _ in range(self.args.epochs):
            yield from _batches(self.data, self.args.batch_size, self.gen, augmented=True)

    def train(self, stream: Any, n: int) -> bool:
        """Take up to ``n`` steps from ``stream``; False once it is exhausted."""
        self.model.train()
        for _ in range(n):
            batch = next(stream, None)
            if batch is None:
                return False
            t0 = time.perf_counter()
            self._step(*batch)
            self.step_time += time.perf_counter() - t0
            self.steps += 1
        return True

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        def closure() -> torch.Tensor:
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            return loss

        if isinstance(self.opt, samopt.SAM):
            self.opt.step(closure)
        else:
            self.opt.zero_grad(set_to_none=True)
            closure()
            self.opt.step()
        self.sched.step()

    @torch.no_grad()
    def accuracy(self) -> float:
        self.model.eval()
        x, y = self.data["x_test"], self.data["y_test"]
        pred = torch.cat([self.model(x[i : i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
        correct = int((pred == y).sum())
        return correct / len(y)


def _batches(data: dict[str, torch.Tensor], bs: int, g: torch.Generator, augmented: bool) -> Any:
    """Shuffled training batches (an iterable that reshuffles on each pass)."""

    class Epochs:
        def __iter__(self):
            perm = torch.randperm(data["x"].shape[0], generator=g)
            for i in range(0, len(perm) - bs + 1, bs):
                idx = perm[i : i + bs]
                x = data["x"][idx]
                yield (augment(x, g) if augmented else x), data["y"][idx]

    return Epochs()


def load() -> dict[str, torch.Tensor]:
    x, y = fashion_mnist("train")
    xt, yt = fashion_mnist("test")

    def norm(t: torch.Tensor) -> torch.Tensor:
        return t.float().div(255).sub(MEAN).div(STD).unsqueeze(1)

    return {"x": norm(x), "y": y, "x_test": norm(xt), "y_test": yt}


def fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    methods = args.methods.split(",")
    data = load()
    keys = ("acc", "rel", "ms", "mask_s", "mask_pct")
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in methods}
    log: Callable[[str], None] = lambda s: print(s, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args}")
    for seed in range(args.seeds):
        runs = {m: Run(m, seed, args, data) for m in methods}
        streams = {m: r.batches() for m, r in runs.items()}
        live, turn = list(methods), 0
        while live:  # methods take turns of SLICE steps, in rotating order
            order = live[turn % len(live) :] + live[: turn % len(live)]
            live = [m for m in order if runs[m].train(streams[m], SLICE)]
            turn += 1
        sgd_ms = runs["sgd"].step_time / runs["sgd"].steps if "sgd" in runs else math.nan
        for m, r in runs.items():
            acc = r.accuracy()
            ms = r.step_time / r.steps
            results[m]["acc"].append(acc)
            results[m]["ms"].append(ms * 1000)
            results[m]["rel"].append(ms / sgd_ms)
            results[m]["mask_s"].append(r.mask_time)
            results[m]["mask_pct"].append(100 * r.mask_time / r.step_time)
            log(
                f"seed {seed} {m}: test acc {acc:.4f}, {ms * 1000:.1f} ms/step, mask updates {r.mask_updates} "
                f"({r.mask_time:.2f} s)"
            )
    log(
        f"\n{args.seeds} seeds x {args.epochs} epochs, small_cnn, batch {args.batch_size}, rho {args.rho}, "
        f"sparsity {args.sparsity}\n"
    )
    log("| method | test acc % (mean ± std) | min - max | ms/step | x SGD | mask updates s (share of train time) |")
    log("|---|---|---|---|---|---|")
    for m in methods:
        r = results[m]
        log(
            f"| {m} | {fmt(r['acc'])} | {100 * min(r['acc']):.2f} - {100 * max(r['acc']):.2f} | "
            f"{statistics.mean(r['ms']):.1f} | {statistics.mean(r['rel']):.2f} | "
            f"{statistics.mean(r['mask_s']):.2f} ({statistics.mean(r['mask_pct']):.1f}%) |"
        )


if __name__ == "__main__":
    main()
