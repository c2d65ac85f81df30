"""What samopt's sharpness measures cost, which Hessian-vector product is faster, and a check against PyHessian.

For each finished run given (any ``samopt train`` or ``samopt glue`` run folder):

1. one Hessian-vector product over the measured batches, double backward against
   forward over reverse (``torch.func``), interleaved round by round; the median seconds
   and their ratio, and the largest difference between the two products;
2. each measure at the ``samopt sharpness`` defaults (or the flags given): seconds and
   passes (HVPs, forward-backward or forward passes), through the same code as
   ``samopt sharpness`` (so the values are also written into the run's summary.json);
3. with ``--pyhessian`` (on image runs), the top eigenvalue of the Hessian of one batch
   in evaluation mode from PyHessian (``pip install pyhessian``; Yao et al., 2020) beside
   samopt's on the same model and batch with ``bn="eval"``, both to a relative
   tolerance of 1e-6.

Usage::

    python benchmarks/sharpness_cost.py runs/noisy/sam-s0 runs/resnet-small-s0 runs/glue-mrpc-s0 --pyhessian
    python benchmarks/sharpness_cost.py RUN --examples 64 --m 32 --probes 10 --rounds 3   # a transformer on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from samopt import diagnostics
from samopt.train.cli import settings_from, sharpness_args
from samopt.train.config import GlueConfig
from samopt.train.loop import device_named
from samopt.train.sharpness import MEASURES, bn_mode, load_run, loss_of, measure, training_batches


def hvp_methods(task, batches, bn: str, rounds: int) -> tuple[dict[str, float], float]:
    """Median seconds of one HVP over ``batches`` per method (interleaved), and the largest difference."""
    times: dict[str, list[float]] = {m: [] for m in diagnostics.HVP_METHODS}
    products = {}
    with diagnostics.preserved(task.model, bn) as params:
        gen = torch.Generator().manual_seed(0)
        v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
        for r in range(rounds):
            order = list(diagnostics.HVP_METHODS)[:: 1 if r % 2 == 0 else -1]
            for method in order:
                if params[0].is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                products[method] = diagnostics.hvp(task.model, loss_of(task), batches, params, v, method=method)
                if params[0].is_cuda:
                    torch.cuda.synchronize()
                times[method].append(time.perf_counter() - t0)
    diff = max(float((a - b).abs().max()) for a, b in zip(products["reverse"], products["forward"], strict=True))
    return {m: statistics.median(t) for m, t in times.items()}, diff


def pyhessian_check(task, batch, tol: float, max_iter: int) -> tuple[float, float]:
    """PyHessian's top eigenvalue of one batch (evaluation mode) and samopt's on the same batch and mode."""
    from pyhessian import hessian  # not a dependency: the check is optional

    model = task.model
    mine = diagnostics.top_eigenvalues(model, loss_of(task), [batch], tol=tol, max_iter=max_iter, bn="eval")
    was = model.training
    x, y = task.prepare(batch[0]), batch[1]
    theirs = hessian(model, lambda out, target: task.loss_fn(out, target), data=(x, y), cuda=x.is_cuda)
    value = theirs.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)[0][0]
    model.train(was)  # PyHessian leaves the model in evaluation mode
    for p in model.parameters():
        p.grad = None  # and its gradients in .grad
    return float(value), mine.values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--measures", default=",".join(MEASURES))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved HVP timings per method")
    parser.add_argument("--pyhessian", action="store_true", help="check the top eigenvalue against PyHessian")
    sharpness_args(parser)  # --examples, --m, --probes, --device, ... as samopt sharpness has them
    args = parser.parse_args()
    settings = dataclasses.replace(settings_from(args, args.measures), progress=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for run_dir in args.runs:
        cfg, task, _ = load_run(run_dir, device_named(settings.device))
        bn = bn_mode(settings, cfg)
        batches = training_batches(task, settings.examples, settings.m)
        n = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
        shape = f"{settings.examples} examples in batches of m={settings.m}, bn={bn}"
        print(f"\n== {run_dir}: {cfg.model}, {n / 1e6:.2f}M parameters, {shape}")
        seconds, diff = hvp_methods(task, batches, bn, args.rounds)
        ratio = seconds["forward"] / seconds["reverse"]
        print(
            f"one HVP over the examples: double backward {seconds['reverse']:.2f} s, forward over reverse "
            f"{seconds['forward']:.2f} s ({ratio:.2f}x); largest difference {diff:.2e}"
        )
        for name, r in measure(run_dir, settings).items():
            work = r.get("hvps", r.get("passes"))
            unit = "HVPs" if "hvps" in r else "passes"
            spread = f" ± {r['stderr']:.3g}" if r.get("stderr") is not None else ""
            print(f"{name:<18} {r['value']:.4g}{spread}  {r['seconds']:.1f} s, {work} {unit}")
        if args.pyhessian and not isinstance(cfg, GlueConfig):
            theirs, mine = pyhessian_check(task, batches[0], 1e-6, 1000)
            print(
                f"top eigenvalue of batch 1 in eval mode: PyHessian {theirs:.5g}, samopt {mine:.5g} "
                f"(relative difference {abs(theirs - mine) / abs(mine):.1e})"
            )


if __name__ == "__main__":
    main()
