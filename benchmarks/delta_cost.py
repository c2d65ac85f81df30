"""Per-step cost of δ-SAM, per estimator, against SAM, measured side by side in one run.

Methods (one optimizer each over its own copy of the model, same batch):
``sam`` (samopt.SAM, the closure does ``mean().backward()``), and ``delta-probe``
(3 probes), ``delta-logit`` and ``delta-exact`` (samopt.DeltaSAM, ``alpha = 1``).
Rounds of ``--steps`` steps per method alternate in rotating order; the table gives
the median time per step and its ratio to SAM. The paper reports about +18% over
SAM for its probe estimator; the logit estimator should cost within 3% of SAM.

Tasks: ``fmnist`` (``small_cnn``, Fashion-MNIST, batch 128, SGD) and ``glue``
(all-MiniLM-L6-v2 on MRPC, batch 16, length 128, AdamW), as in
``benchmarks/delta_alignment.py``.

Usage::

    python benchmarks/delta_cost.py --task fmnist --rounds 10
    python benchmarks/delta_cost.py --task glue --rounds 5 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import samopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from delta_alignment import fmnist_task, glue_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("fmnist", "glue"), default="fmnist")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (fmnist), 16 (glue)")
    parser.add_argument("--methods", default="sam,delta-probe,delta-logit,delta-exact")
    args = parser.parse_args()
    bs = args.batch_size or (128 if args.task == "fmnist" else 16)
    model, stream, forward, base, base_kw = (fmnist_task if args.task == "fmnist" else glue_task)(bs, 0)
    batch = next(stream)
    steppers = {}
    for name in args.methods.split(","):
        m = copy.deepcopy(model)
        m.train()
        if name == "sam":
            opt = samopt.SAM(m.parameters(), base, rho=0.05, **base_kw)

            def step(m=m, opt=opt) -> None:
                def closure():
                    loss = forward(m, batch, None)[0].mean()
                    loss.backward()
                    return loss

                opt.step(closure)
        else:
            est = name.removeprefix("delta-")
            opt = samopt.DeltaSAM(m.parameters(), base, rho=0.05, estimator=est, alpha=1.0, **base_kw)

            def step(m=m, opt=opt) -> None:
                opt.step(lambda: forward(m, batch, None))

        steppers[name] = step
    for step in steppers.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    names = list(steppers)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steppers[name]()
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, task {args.task}, batch {bs}, "
        f"{args.rounds} rounds x {args.steps} steps\n"
    )
    print("| method | ms/step (median) | x SAM |")
    print("|---|---|---|")
    for name in names:
        print(f"| {name} | {med[name] * 1000:.1f} | {med[name] / med['sam']:.3f} |")


if __name__ == "__main__":
    main()
