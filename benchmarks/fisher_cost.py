"""Cost of one SSAM-F mask update: vectorised per-example gradients against a batch-1 loop.

On a ResNet-scale model (CIFAR ResNet-18, 11.2M parameters, here on Fashion-MNIST
images so that the inputs are real), the script times, side by side in one run
(interleaved round by round, rotating the order):

- ``loop``: the official Sparse SAM procedure, ``num_samples`` batch-1
  forward/backward passes accumulating squared gradients (on a copy of the model,
  so that its BatchNorm statistics do not drift);
- ``samopt-vmap``: :meth:`samopt.masks.FisherMask.scores` with ``vectorize=True``
  (``torch.func`` per-example gradients in memory-bounded chunks, model untouched);
- ``samopt-loop``: the same with ``vectorize=False`` (batch-1 ``torch.autograd.grad``
  calls through ``functional_call``, model untouched);
- ``update``: a whole mask update as configured by default for the device (scores
  plus the global top-k);
- ``sam-step``: one samopt SAM training step at batch 128, the unit of cost.

It prints the median of each and the ratios of the loop to each samopt path and of
a mask update to a training step.

Usage::

    python benchmarks/fisher_cost.py                     # 16 samples (the README's CIFAR setting), 3 rounds
    python benchmarks/fisher_cost.py --num-samples 128 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import samopt
from samopt.masks import FisherMask
from samopt.train.data import fashion_mnist
from samopt.train.models import resnet18


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)

    x, y = fashion_mnist("train")
    x = (x[:2048].float().div(255).sub(0.2860).div(0.3530)).unsqueeze(1).to(dev)
    y = y[:2048].to(dev)
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=1).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    fisher_data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, x.shape[0], 64)]
    mask = FisherMask(
        model,
        fisher_data,
        F.cross_entropy,
        sparsity=0.5,
        num_samples=args.num_samples,
        update_interval=None,
        chunk_size=args.chunk_size,
    )
    opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.01, momentum=0.9)
    params = list(model.parameters())
    xb, yb = x[: args.batch_size], y[: args.batch_size]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def loop() -> None:
        ref = copy.deepcopy(model)
        acc = [torch.zeros_like(p) for p in ref.parameters()]
        xs, ys = mask.samples(args.num_samples)
        for i in range(args.num_samples):
            ref.zero_grad(set_to_none=True)
            F.cross_entropy(ref(xs[i : i + 1]), ys[i : i + 1]).backward()
            for a, p in zip(acc, ref.parameters(), strict=True):
                a.add_(p.grad.square())

    def scores(vectorize: bool) -> None:
        mask.vectorize = vectorize
        mask.scores(params)
        mask.vectorize = None

    def update() -> None:
        mask.masks = None  # force a new mask
        mask.maybe_update([None] * len(params))

    def sam_step() -> None:
        def closure():
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)

    tasks = {
        "loop": loop,
        "samopt-vmap": lambda: scores(True),
        "samopt-loop": lambda: scores(False),
        "update": update,
        "sam-step": sam_step,
    }
    for fn in tasks.values():  # warm-up (and the first mask)
        fn()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    names = list(tasks)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            tasks[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")
    print(
        f"ResNet-18 ({n_params / 1e6:.2f}M parameters), Fashion-MNIST 28x28, {args.num_samples} Fisher samples, "
        f"chunk {mask.chunk_size or 'auto'}, SAM step at batch {args.batch_size}, {args.rounds} rounds\n"
    )
    print("| what | s (median) |")
    print("|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nloop / samopt-vmap: {med['loop'] / med['samopt-vmap']:.2f}")
    print(f"loop / samopt-loop: {med['loop'] / med['samopt-loop']:.2f}")
    print(f"mask update / SAM step: {med['update'] / med['sam-step']:.2f}")


if __name__ == "__main__":
    main()
