"""Evaluation time of the image models by evaluation batch size, measured side by side.

``samopt train`` evaluates the in-memory test set (and, with label noise, the training
images whose label was flipped) after every epoch. This times that evaluation, an
eval-mode forward without gradients over the same images, at several batch sizes,
interleaved round by round so that the noise of a shared machine hits them alike, and
prints the median time per pass and its ratio to the first size.

Workloads:
  fmnist  the fmnist-demo recipe's small CNN over 3,200 images at 28x28 (its 2,000 test
          images and about 1,200 flipped training images)
  cifar   resnet-small over 2,000 images at 32x32

Usage::

    python benchmarks/eval_batch.py                       # both workloads, sizes 1000,128
    python benchmarks/eval_batch.py --sizes 1000,256,128 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from samopt.train.models import resnet_small, small_cnn

WORKLOADS = {
    "fmnist": (lambda: small_cnn(10, 1), (3200, 1, 28, 28)),
    "cifar": (lambda: resnet_small(10, 3), (2000, 3, 32, 32)),
}


@torch.no_grad()
def one_pass(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    began = time.perf_counter()
    for i in range(0, len(x), batch):
        model(x[i : i + batch]).argmax(1)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="fmnist,cifar")
    parser.add_argument("--sizes", default="1000,128", help="comma-separated batch sizes; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name in args.workloads.split(","):
        build, shape = WORKLOADS[name]
        torch.manual_seed(0)
        model, x = build().eval(), torch.randn(shape)
        times: dict[int, list[float]] = {s: [] for s in sizes}
        for s in sizes:  # warm-up
            one_pass(model, x, s)
        for r in range(args.rounds):
            for s in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
                times[s].append(one_pass(model, x, s))
        first = statistics.median(times[sizes[0]])
        print(f"\n{name}: {shape[0]} images")
        print("| batch | s per pass (median) | x batch " + str(sizes[0]) + " |\n|---|---|---|")
        for s in sizes:
            median = statistics.median(times[s])
            print(f"| {s} | {median:.3f} | {median / first:.2f} |")


if __name__ == "__main__":
    main()
