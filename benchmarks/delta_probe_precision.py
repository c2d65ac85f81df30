"""Does δ-SAM's per-example norm estimate survive autocast? Its estimate against the exact norm, per precision.

δ-SAM (Zhou et al., Findings of EMNLP 2022) weights each example of the ascent by an
estimate ``s_i`` of its gradient norm ``||grad l_i||``. The ``"probe"`` estimator takes it
from loss differences at ``w + sigma z`` with ``sigma = rho / sqrt(#params)``, so the
weights move by about ``2e-6`` on MiniLM: far below bfloat16's spacing (``2^-8`` of a
weight's size) and the logits' rounding. This script measures, along a SAM training run
(at ``--batches`` batches, on the current weights and batch, model in eval mode),
``s_i`` from ``samopt.DeltaSAM`` (its ``last_scores``) for each estimator with the
closure's forward in float32 and under bfloat16 autocast, against the exact per-example
norms in float32 (``estimator="exact"``). Reported over all examples: the median relative
error of ``s_i`` divided by its batch's mean, against the same for the exact norms (the
weights depend on ``s`` only up to a factor; the logit estimator measures the norm with
respect to the logits, on another scale), beside a constant ``s`` (SAM's weights) as the
baseline; the within-batch correlation of ``s`` with the exact norms; and the mean ratio
``s_i / exact_i``.

Tasks as in ``benchmarks/delta_alignment.py`` (fmnist: ``small_cnn``; glue: MiniLM on a
GLUE training set).

Usage::

    python benchmarks/delta_probe_precision.py --task glue --batches 10
    python benchmarks/delta_probe_precision.py --task fmnist --batches 10
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from delta_alignment import add_task_arguments, task_of, train_step

import samopt

#: (estimator, autocast dtype or None) of each measured configuration.
CONFIGS = (("probe", None), ("probe", torch.bfloat16), ("logit", None), ("logit", torch.bfloat16))
#: The baseline row: the same s_i for every example (SAM's weights).
CONSTANT = "constant (SAM)"


def scores(params: list[torch.Tensor], closure: Any, estimator: str, args: argparse.Namespace) -> torch.Tensor:
    """``s_i`` of one batch as ``samopt.DeltaSAM`` computes it (a zero learning rate, weights put back)."""
    opt = samopt.DeltaSAM(
        params, torch.optim.SGD, rho=args.rho, estimator=estimator, num_probes=args.num_probes, seed=args.seed, lr=0.0
    )
    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    assert opt.last_scores is not None
    return opt.last_scores.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_task_arguments(parser, "glue")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.01)
    parser.add_argument("--num-probes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, stream, forward, base, base_kw = task_of(args, args.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = samopt.SAM(params, base, rho=args.rho, **base_kw)
    rows = [f"{e}, {'float32' if d is None else 'bfloat16 autocast'}" for e, d in CONFIGS] + [CONSTANT]
    errors: dict[str, list[float]] = {r: [] for r in rows}
    ratios: dict[str, list[float]] = {r: [] for r in rows[:-1]}
    corrs: dict[str, list[float]] = {r: [] for r in rows[:-1]}
    n = sum(p.numel() for p in params)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.task}, {n / 1e6:.2f}M parameters "
        f"(probe sigma {args.rho / n**0.5:.2g}), {args}",
        flush=True,
    )
    for b in range(args.batches):
        batch = next(stream)
        model.eval()

        def closure(dtype: torch.dtype | None = None, batch: Any = batch) -> Any:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return forward(model, batch, None)

        exact = scores(params, closure, "exact", args)
        truth = exact / exact.mean()  # the weights depend on s only up to a factor
        for row, (estimator, dtype) in zip(rows[:-1], CONFIGS, strict=True):
            s = scores(params, lambda dtype=dtype: closure(dtype), estimator, args)
            errors[row] += ((s / s.mean() - truth).abs() / truth).tolist()
            ratios[row] += (s / exact).tolist()
            corrs[row].append(float(torch.corrcoef(torch.stack([s, exact]))[0, 1]))
        errors[CONSTANT] += ((1 - truth).abs() / truth).tolist()
        loss = train_step(trainer, model, forward, batch)
        print(f"batch {b}: loss {float(loss.detach()):.4f}", flush=True)
    print(f"\n{args.task}: δ-SAM's s_i against the exact per-example norm, {len(errors[CONSTANT])} examples\n")
    print("| s_i from | median relative error of s / mean(s) | in-batch correlation with exact | mean s / exact |")
    print("|---|---|---|---|")
    for row in rows:
        corr = f"{statistics.mean(corrs[row]):.3f}" if row in corrs else ""
        ratio = f"{statistics.mean(ratios[row]):.2f}" if row in ratios else ""
        print(f"| {row} | {statistics.median(errors[row]):.3f} | {corr} | {ratio} |")


if __name__ == "__main__":
    main()
