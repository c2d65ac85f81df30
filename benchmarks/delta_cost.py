"""Per-step cost of δ-SAM, per estimator, against SAM, measured side by side in one run.

Methods (one optimizer each over its own copy of the model, same batch):
``base`` (the base optimizer alone: one forward/backward), ``sam`` (samopt.SAM, the
closure does ``mean().backward()``), and ``delta-probe``
(3 probes), ``delta-logit`` and ``delta-exact`` (samopt.DeltaSAM, ``alpha = 1``).
Rounds of ``--steps`` steps per method alternate in rotating order; the table gives
the median time per step and its ratio to SAM. The paper reports about +18% over
SAM for its probe estimator; the logit estimator should cost within 3% of SAM.

Tasks: ``fmnist`` (``small_cnn``, Fashion-MNIST, batch 128, SGD) and ``glue``
(all-MiniLM-L6-v2 on MRPC, batch 16, length 128, AdamW), as in
``benchmarks/delta_alignment.py``. On a GPU (``--device cuda``) each round is timed
after a ``torch.cuda.synchronize()``; ``--amp bf16`` runs the forward passes (probes
included) under bf16 autocast.

Usage::

    python benchmarks/delta_cost.py --task fmnist --rounds 10
    python benchmarks/delta_cost.py --task glue --rounds 5 --steps 2
    python benchmarks/delta_cost.py --task glue --device cuda --batch-size 32 --rounds 20 --steps 10
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
from delta_alignment import GLUE_DIR, PACKAGED_MODEL, fmnist_task, glue_task


def to(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to(v, device) for k, v in batch.items()}
    return type(batch)(to(b, device) for b in batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("fmnist", "glue"), default="fmnist")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (fmnist), 16 (glue)")
    parser.add_argument("--methods", default="sam,delta-probe,delta-logit,delta-exact", help="also: base")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast of the forward passes")
    parser.add_argument("--model", default=PACKAGED_MODEL, help="glue: the packaged MiniLM, or a local or hub path")
    parser.add_argument("--glue-dir", type=Path, default=GLUE_DIR, help="glue: the folder holding MRPC")
    args = parser.parse_args()
    device = torch.device(args.device)
    bs = args.batch_size or (128 if args.task == "fmnist" else 16)
    if args.task == "fmnist":
        model, stream, forward, base, base_kw = fmnist_task(bs, 0)
    else:
        model, stream, forward, base, base_kw = glue_task(bs, 0, "mrpc", args.model, args.glue_dir)
    model.to(device)
    batch = to(next(stream), device)

    def loss(m):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            return forward(m, batch, None)

    steppers = {}
    for name in args.methods.split(","):
        m = copy.deepcopy(model)
        m.train()
        if name == "base":
            plain = base(m.parameters(), **base_kw)

            def step(m=m, plain=plain) -> None:
                plain.zero_grad()
                loss(m)[0].mean().backward()
                plain.step()

        elif name == "sam":
            opt = samopt.SAM(m.parameters(), base, rho=0.05, **base_kw)

            def step(m=m, opt=opt) -> None:
                def closure():
                    mean = loss(m)[0].mean()
                    mean.backward()
                    return mean

                opt.step(closure)
        else:
            est = name.removeprefix("delta-")
            opt = samopt.DeltaSAM(m.parameters(), base, rho=0.05, estimator=est, alpha=1.0, **base_kw)

            def step(m=m, opt=opt) -> None:
                opt.step(lambda: loss(m))

        steppers[name] = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steppers.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    names = list(steppers)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steppers[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, threads {torch.get_num_threads()}"
    print(
        f"torch {torch.__version__}, {where}, task {args.task}, batch {bs}, amp {args.amp}, "
        f"{args.rounds} rounds x {args.steps} steps\n"
    )
    print("| method | ms/step (median) | x SAM |")
    print("|---|---|---|")
    for name in names:
        print(f"| {name} | {med[name] * 1000:.1f} | {med[name] / med['sam']:.3f} |")


if __name__ == "__main__":
    main()
