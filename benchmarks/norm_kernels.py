"""Global gradient norm on CPU: ``torch._foreach_norm`` against BLAS dot products and samopt's mix.

samopt's ``functional.global_norm`` uses a dot product for large contiguous fp32/fp64
CPU tensors (>= ``DOT_MIN_NUMEL`` elements) and ``_foreach_norm`` for the rest. This
prints the median time of each strategy on three parameter layouts, side by side.

Usage::

    python benchmarks/norm_kernels.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from samopt import functional as F

LAYOUTS = {
    "MLP 10.5M (7 tensors)": [(2048, 2048)] * 2 + [(2048, 1024), (10, 2048)] + [(2048,)] * 3,
    "ResNet-like 11M (88 tensors)": [(64, 64, 3, 3)] * 16
    + [(64,)] * 40
    + [(128, 128, 3, 3)] * 4
    + [(256, 256, 3, 3)] * 4
    + [(512, 512, 3, 3)] * 4
    + [(512,)] * 20,
    "many small 1.7M (400 tensors)": [(64, 64)] * 200 + [(64,)] * 200,
}


def foreach_only(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts, 2)))


def dot_only(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.dot(t.view(-1), t.view(-1)) for t in ts]).sum().sqrt()


def median_ms(fn: Callable[[], object], reps: int = 40) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, DOT_MIN_NUMEL {F.DOT_MIN_NUMEL}\n")
    print("| layout | _foreach_norm ms | dot ms | samopt global_norm ms |")
    print("|---|---|---|---|")
    for name, shapes in LAYOUTS.items():
        ts = [torch.randn(s) for s in shapes]
        row = [median_ms(lambda f=f, ts=ts: f(ts)) for f in (foreach_only, dot_only, F.global_norm)]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
