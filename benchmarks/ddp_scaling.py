"""`samopt train` on 1 and N ranks (torchrun), SAM with sync="global" and sync="local", side by side.

Each configuration is a real ``samopt train`` run (``torchrun --nproc_per_node N``
for N > 1) on Fashion-MNIST (clean labels, the small ResNet); rounds interleave the configurations in rotating order
so a shared machine's noise hits all alike. Reported per configuration: the median
over rounds of the last epoch's training time per global step, the throughput
(images/s, all ranks) and per rank, the time relative to the same optimizer on one
rank, SAM-global over SAM-local on the same ranks (the cost of the first pass's
all-reduce), and the test accuracy of the last round.

Under torchrun every rank gets ``OMP_NUM_THREADS=1`` (torchrun's default); one rank
alone uses ``--threads`` (default: all cores), so both use the same cores.

Usage::

    python benchmarks/ddp_scaling.py                               # sgd, sam global/local on 1 and 2 ranks
    python benchmarks/ddp_scaling.py --ranks 1,2 --rounds 3 --train-subset 8192 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: The small ResNet of docs/benchmarks.md's table (the ``fmnist-demo`` recipe until issue 16 made it the
#: label-noise demo), given in full so that the recipe's changes do not change what this script measures.
WORKLOAD = ["--dataset", "fashion-mnist", "--model", "resnet-small", "--lr", "0.05", "--weight-decay", "5e-4"]


def configs(optimizers: list[str], ranks: list[int]) -> list[tuple[str, str, int]]:
    """(optimizer, sync, ranks) triples; sync only varies for the SAM family on several ranks."""
    out = []
    for n in ranks:
        for opt in optimizers:
            syncs = ["global", "local"] if opt != "sgd" and n > 1 else ["global"]
            out += [(opt, s, n) for s in syncs]
    return out


def run_one(opt: str, sync: str, n: int, args: argparse.Namespace, out: Path) -> dict:
    flags = [
        "train", *WORKLOAD, "--optimizer", opt, "--sync", sync, "--epochs", str(args.epochs),
        "--train-subset", str(args.train_subset), "--batch-size", str(args.batch_size), "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ)
    cli = ["-m", "samopt.train.cli", *flags]
    if n == 1:
        cmd = [sys.executable, *cli]
        env["OMP_NUM_THREADS"] = str(args.threads)
    else:  # torchrun, as the module it is
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *cli]
        env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    last = summary["history"][-1]
    return {"step": last["train_seconds"] / last["steps"], "acc": last.get("test_acc")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default="sgd,sam")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=6144)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    cells = configs(args.optimizers.split(","), [int(n) for n in args.ranks.split(",")])
    times: dict[tuple, list[float]] = {c: [] for c in cells}
    acc: dict[tuple, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = cells[rnd % len(cells) :] + cells[: rnd % len(cells)]
            for c in order:
                res = run_one(*c, args, Path(tmp) / f"{'-'.join(map(str, c))}-r{rnd}")
                times[c].append(res["step"])
                acc[c] = res["acc"]
                print(f"round {rnd + 1}: {c[0]} sync={c[1]} ranks={c[2]}: {res['step'] * 1e3:.1f} ms/step", flush=True)
    med = {c: statistics.median(t) for c, t in times.items()}
    print(
        "\n| optimizer | sync | ranks | ms/step | images/s | images/s per rank | vs 1 rank | global/local | test acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        opt, sync, n = c
        one = med.get((opt, "global", 1))
        vs_one = f"{med[c] / one:.2f}x" if one and n > 1 else ""
        local = med.get((opt, "local", n))
        ratio = f"{med[c] / local:.3f}" if sync == "global" and local else ""
        ips = args.batch_size / med[c]
        shown = "" if acc[c] is None else f"{100 * acc[c]:.2f}"
        print(
            f"| {opt} | {sync} | {n} | {med[c] * 1e3:.1f} | {ips:.0f} | {ips / n:.0f} | {vs_one} | {ratio} | {shown} |"
        )


if __name__ == "__main__":
    main()
