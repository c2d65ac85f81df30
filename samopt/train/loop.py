"""One training run of ``samopt train`` or ``samopt glue``: optimizer, schedule, checkpoints and metrics.

What is trained is a :class:`Task` (model, batches, loss, evaluation), built by
:mod:`samopt.train.vision` for image classification and :mod:`samopt.train.glue` for
GLUE. :func:`run` trains ``cfg.epochs`` epochs and evaluates after each. It writes
into ``cfg.out``:

- ``metrics.jsonl``: one JSON line per epoch (train loss, and accuracy for
  classification, from the clean pass at ``w``; the task's evaluation metrics; learning
  rate; training seconds; steps; mask density);
- ``checkpoint.pt``: everything needed to continue exactly (model, optimizer with its
  masks and δ-SAM state, scheduler, grad scaler, RNG, data position, metrics so far),
  written after every epoch and when the run is interrupted (Ctrl-C or SIGTERM finish
  the current step, save and exit with status 130); each write goes to a temporary
  file that replaces the old one, so a crash mid-write loses nothing;
- ``summary.json``: final and best score (the task's headline metric), the last
  epoch's metrics, wall time, training time per epoch and per step, peak memory over
  every process of the run, and the full configuration.

``cfg.resume`` continues from ``checkpoint.pt``: the batches, augmentations, masks and
weights are then the same as those of an uninterrupted run (bit for bit on a CPU; on a
GPU with ``cfg.deterministic``, since cuDNN otherwise picks non-deterministic kernels).

Under ``torchrun --nproc_per_node N`` (:mod:`samopt.train.launch`) each rank trains on
its ``1/N`` of every global batch of ``cfg.batch_size`` through
``DistributedDataParallel``, the SAM family perturbs as ``cfg.sync`` says, and rank 0
alone evaluates, prints and writes; the checkpoint holds the unwrapped model and the
global batch position, so it continues on any number of ranks (the global RNG, used by
dropout, comes back per rank when the number of ranks is the same, else from rank 0).

Example::

    from samopt.train.config import resolve
    summary = run(resolve("fmnist-demo", {"optimizer": "sam", "out": "runs/sam"}))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import samopt
from samopt import _validate
from samopt import distributed as D
from samopt.train.config import GlueConfig, RunConfig
from samopt.train.launch import Ranks, Shard, setup
from samopt.train.optimizers import AMP_MODES, OPTIMIZERS, Amp, build_optimizer, train_step

__all__ = ["CheckpointError", "Loader", "Task", "lr_factor", "run", "validate"]

CHECKPOINT_FORMAT = 1
SCHEDULES = ("cosine", "linear", "multistep", "constant")
#: Settings a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = frozenset(
    {"data_dir", "download", "workers", "device", "progress", "resume", "out", "deterministic"}
)
EXIT_INTERRUPTED = 130


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run that would continue it."""


class Loader(Protocol):
    """Batches ``(inputs, targets)`` of an epoch, from batch ``start`` on; ``len()`` is the batches per epoch."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class Task:
    """What a run trains: the model, its batches, its loss and how it is evaluated.

    ``evaluate(model, amp)`` returns named metrics (evaluation loss included);
    ``score`` names the one that summarises a run (higher is better); ``classification``
    says whether the training accuracy (argmax of the outputs) is meaningful.
    """

    model: nn.Module
    train: Loader
    fisher: Loader | None
    loss_fn: Callable[..., Tensor]
    evaluate: Callable[[nn.Module, Amp], dict[str, float]]
    score: str
    classification: bool = True
    prepare: Callable[[Tensor], Tensor] = lambda x: x  # e.g. to channels_last


def validate(cfg: RunConfig) -> None:
    """Check the shared settings that no library call checks, before any work is done."""
    _validate.choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _validate.choice("schedule", cfg.schedule, SCHEDULES)
    _validate.choice("amp", cfg.amp, AMP_MODES)
    _validate.choice("sync", cfg.sync, samopt.sam.SYNC_MODES)
    for name in ("epochs", "batch_size", "mask_interval"):
        _validate.positive_int(name, getattr(cfg, name))
    for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "gamma"):
        _validate.nonnegative(name, getattr(cfg, name))
    _validate.unit_interval("label_smoothing", cfg.label_smoothing, include_one=True)
    _validate.positive_or_none("max_grad_norm", cfg.max_grad_norm)
    _task_module(cfg).validate(cfg)  # the task's own settings (data set, model, ...), without loading anything
    if cfg.warmup_epochs > cfg.epochs:
        raise ValueError(f"warmup_epochs must be at most epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    if sorted(cfg.milestones) != list(cfg.milestones) or any(m < 1 for m in cfg.milestones):
        raise ValueError(f"milestones must be increasing epoch numbers >= 1, got {cfg.milestones}")


def _task_module(cfg: RunConfig) -> Any:
    """The module with ``validate(cfg)`` and ``build_task(cfg, device)`` for ``cfg``'s kind of run."""
    if isinstance(cfg, GlueConfig):
        from samopt.train import glue

        return glue
    from samopt.train import vision

    return vision


def lr_factor(cfg: RunConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at a step: linear warmup, then cosine or linear decay to 0,
    multiplication by ``gamma`` at each of the ``milestones`` (epochs), or constant."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return 1.0 - progress
        if cfg.schedule == "multistep":
            epoch = step / steps_per_epoch
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return factor


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here; use --device cpu")
    return dev


class _FisherStream:
    """SSAM-F's data: the Fisher loader's epoch 0 on every pass (the same order, so a resumed run sees it too)."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __iter__(self):
        return self.loader.epoch(0)


class _Interrupt:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if hasattr(signal, "SIGTERM") and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: finishing this step, then saving a checkpoint (again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The settings of ``cfg`` that differ from the ``saved`` ones, except those a resumed run may change.

    A setting missing from ``saved`` (written before it existed) counts as its default.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    return [
        f"{k}: checkpoint {saved.get(k, defaults.get(k))!r}, now {v!r}"
        for k, v in dataclasses.asdict(cfg).items()
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != v
    ]


def load_checkpoint(path: Path, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, checked against ``cfg`` and ``device``: a :class:`CheckpointError` if it does not
    fit. The device may change within a type (``cuda:0`` to ``cuda:1``), not across: the random streams differ."""
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path}; start without --resume, or point --out at the run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {reason}); it is corrupt or "
            "not a samopt checkpoint. Delete it to start over"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a samopt train checkpoint of format {CHECKPOINT_FORMAT}")
    diff = config_differences(ckpt["config"], cfg)
    if ckpt["device_type"] != device.type:
        diff.append(f"device type: checkpoint {ckpt['device_type']!r}, now {device.type!r}")
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was written by a different run; it does not match in "
            + "; ".join(diff)
            + ". Resume with the same settings, or use another --out"
        )
    return ckpt


def _peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 1024), "process peak RSS"


class _Tally:
    """Training loss, accuracy and time of an epoch, continuing the ``saved`` part of an interrupted one."""

    def __init__(self, saved: dict[str, Any] | None, device: torch.device) -> None:
        self.saved = saved or {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen, self.t0 = 0, time.perf_counter()

    def add(self, loss: Tensor, logits: Tensor, y: Tensor, classification: bool) -> None:
        self.loss += loss.double() * len(y)  # no host sync per step
        if classification:
            self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)

    def mean_loss(self) -> float:
        return (self.saved["loss"] + float(self.loss)) / max(1, self.saved["seen"] + self.seen)

    def snapshot(self) -> dict[str, Any]:
        s = self.saved
        return {
            "loss": s["loss"] + float(self.loss),
            "correct": s["correct"] + int(self.correct),
            "seen": s["seen"] + self.seen,
            "seconds": s["seconds"] + time.perf_counter() - self.t0,
        }


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _sum_over_ranks(snapshot: dict[str, Any], ranks: Ranks, device: torch.device) -> dict[str, Any]:
    """An epoch's tally summed over the ranks (the slowest rank's seconds)."""
    if ranks.world == 1:
        return snapshot
    t = torch.tensor([snapshot["loss"], snapshot["correct"], snapshot["seen"]], dtype=torch.float64, device=device)
    secs = torch.tensor([snapshot["seconds"]], dtype=torch.float64, device=device)
    D.all_reduce_([t], "sum")
    D.all_reduce_([secs], "max")
    return {"loss": float(t[0]), "correct": int(t[1]), "seen": int(t[2]), "seconds": float(secs)}


def _any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (so all stop at the same step)."""
    if ranks.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    D.all_reduce_([t], "max")
    return bool(t.item())


def _from_main(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train as ``cfg`` says (see the module docstring); returns the summary also written to ``summary.json``.

    A :class:`~samopt.train.config.TrainConfig` trains an image classifier, a
    :class:`~samopt.train.config.GlueConfig` fine-tunes on a GLUE task. Exits with
    :data:`EXIT_INTERRUPTED` (``SystemExit``) after saving a checkpoint when interrupted.
    Under ``torchrun`` it joins the ranks' process group first and leaves it at the end.
    """
    validate(cfg)
    joined = not (dist.is_available() and dist.is_initialized())
    ranks, device_name = setup(cfg.device)
    joined = joined and ranks.world > 1
    together = False  # whether every rank leaves together (a normal end, or a stop all ranks agreed on)
    try:
        summary = _run(cfg, ranks, _device(device_name))
        together = True
        return summary
    except SystemExit:
        together = True
        raise
    finally:
        if joined:
            if together:
                ranks.barrier()  # no rank tears the group down while another still talks to it
            dist.destroy_process_group()


def _run(cfg: RunConfig, ranks: Ranks, device: torch.device) -> dict[str, Any]:
    for name in ("batch_size", "num_samples") if cfg.optimizer == "ssam-f" else ("batch_size",):
        if getattr(cfg, name) % ranks.world:
            raise ValueError(
                f"{name} ({getattr(cfg, name)}) must be a multiple of the number of ranks ({ranks.world}): "
                "each rank takes an equal share"
            )
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    amp = Amp(cfg.amp, device)
    out = Path(cfg.out or cfg.default_out())
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path, cfg, device) if cfg.resume else None
    if ckpt is None and ckpt_path.exists():
        raise CheckpointError(f"{out} already holds a checkpoint: pass --resume to continue it, or use another --out")
    ranks.barrier()  # no rank writes into out before every rank has checked it
    if not ranks.main:
        ranks.barrier()  # rank 0 builds the task first: it alone downloads and unpacks a missing data set
    task = _task_module(cfg).build_task(cfg, device)  # seeds the model's initialisation with cfg.seed
    if ranks.main:
        ranks.barrier()
    model, steps_per_epoch = task.model, len(task.train)
    train = Shard(task.train, ranks)
    fisher = _FisherStream(Shard(task.fisher, ranks)) if task.fisher is not None else None
    net: nn.Module = model
    if ranks.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_optimizer(
        cfg, model, steps_per_epoch, fisher, task.loss_fn, ddp=net if ranks.world > 1 else None, world=ranks.world
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))

    state: dict[str, Any] = {"epoch": 0, "batch": 0, "history": [], "partial": None, "wall": 0.0, "peak": 0.0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        amp.scaler.load_state_dict(ckpt["scaler"])
        per_rank = ckpt.get("rng_ranks")
        _set_rng_state(per_rank[ranks.rank] if per_rank and len(per_rank) == ranks.world else ckpt["rng"])
        state = {k: ckpt[k] for k in state}
    metrics_path = out / "metrics.jsonl"
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(metrics_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in state["history"]), "w")

    def save(epoch: int, batch: int, partial: dict[str, Any] | None, wall: float) -> None:
        rngs = [_rng_state()]
        if ranks.world > 1:
            rngs = [None] * ranks.world
            dist.all_gather_object(rngs, _rng_state())
        if not ranks.main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(cfg),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": amp.scaler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs,
            "epoch": epoch,
            "batch": batch,
            "partial": partial,
            "history": state["history"],
            "wall": wall,
            "peak": max(state["peak"], _peak_memory_mib(device)[0]),  # over every process of the run
            "device_type": device.type,
        }
        _atomic_write(ckpt_path, lambda f: torch.save(payload, f))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall0 = time.perf_counter() - state["wall"]
    label = f"{cfg.optimizer} s{cfg.seed}"
    with _Interrupt() as interrupt:
        for epoch in range(state["epoch"], cfg.epochs):
            resumed = epoch == state["epoch"]
            start = state["batch"] if resumed else 0
            # the saved part of an interrupted epoch is already summed over the ranks: rank 0 carries it
            tally = _Tally(state["partial"] if resumed and ranks.main else None, device)
            bar = _progress(
                steps_per_epoch, start, f"epoch {epoch + 1}/{cfg.epochs} {label}", cfg.progress and ranks.main
            )
            model.train()
            batch = start
            for x, y in train.epoch(epoch, start):
                try:
                    loss, logits = train_step(opt, net, task.prepare(x), y, task.loss_fn, amp, cfg.max_grad_norm)
                except samopt.NonFiniteGradientError as e:
                    raise FloatingPointError(
                        f"the training diverged in epoch {epoch + 1}, step {batch + 1} ({str(e).split(';')[0]}); "
                        "lower --lr, --rho"
                    ) from e
                lr = opt.param_groups[0]["lr"]
                sched.step()
                tally.add(loss, logits, y, task.classification)
                batch += 1
                if bar is not None:
                    bar.update(1)
                    if batch % 20 == 0 or batch == steps_per_epoch:
                        bar.set_postfix(loss=f"{tally.mean_loss():.4f}")
                if _any_rank(interrupt.requested, ranks, device) and batch < steps_per_epoch:
                    if bar is not None:
                        bar.close()
                    save(epoch, batch, _sum_over_ranks(tally.snapshot(), ranks, device), time.perf_counter() - wall0)
                    if ranks.main:
                        print(
                            f"checkpoint saved to {ckpt_path} (epoch {epoch + 1}, step {batch}); "
                            "continue with --resume",
                            file=sys.stderr,
                        )
                    raise SystemExit(EXIT_INTERRUPTED)
            if bar is not None:
                bar.close()
            done = _sum_over_ranks(tally.snapshot(), ranks, device)
            if not math.isfinite(done["loss"]):
                raise FloatingPointError(f"the training loss became non-finite in epoch {epoch + 1}; lower --lr, --rho")
            record = None
            if ranks.main:
                metrics = task.evaluate(model, amp)
                record = {"epoch": epoch + 1, "train_loss": done["loss"] / done["seen"]}
                if task.classification:
                    record["train_acc"] = done["correct"] / done["seen"]
                record.update(metrics)
                record.update({"lr": lr, "train_seconds": done["seconds"], "steps": steps_per_epoch})  # last step's lr
                if isinstance(opt, samopt.SAM):
                    record["mask_density"] = opt.mask_density()
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            record = _from_main(record, ranks)
            state["history"].append(record)
            save(epoch + 1, 0, None, time.perf_counter() - wall0)
            if ranks.main:
                shown = ", ".join(
                    f"{k} {v:.4f}"
                    for k, v in record.items()
                    if k not in ("epoch", "lr", "steps") and not k.endswith("seconds")
                )
                print(f"{label} epoch {epoch + 1}/{cfg.epochs}: {shown} ({done['seconds']:.1f} s)", flush=True)
            if _any_rank(interrupt.requested, ranks, device) and epoch + 1 < cfg.epochs:
                if ranks.main:
                    print(f"checkpoint saved to {ckpt_path}; continue with --resume", file=sys.stderr)
                raise SystemExit(EXIT_INTERRUPTED)
    history = state["history"]
    peak, peak_kind = _peak_memory_mib(device)
    peak = max(peak, state["peak"])
    summary = {
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "score": task.score,
        "final_score": history[-1][task.score],
        "best_score": max(r[task.score] for r in history),
        "final": {k: v for k, v in history[-1].items() if k not in ("epoch", "lr", "steps", "train_seconds")},
        "wall_seconds": time.perf_counter() - wall0,
        "seconds_per_epoch": sum(r["train_seconds"] for r in history) / len(history),
        "seconds_per_step": sum(r["train_seconds"] for r in history) / sum(r["steps"] for r in history),
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "device": str(device),
        "ranks": ranks.world,
        "out": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
        "config": dataclasses.asdict(cfg),
    }
    if ranks.main:
        _atomic_write(out / "summary.json", lambda f: json.dump(summary, f, indent=1), "w")
    return summary
