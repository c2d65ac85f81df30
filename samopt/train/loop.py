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

import contextlib
import dataclasses
import gc
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import samopt
from samopt import distributed as D
from samopt import validation
from samopt.masks import GRANULARITIES
from samopt.train import glue, vision
from samopt.train.config import GlueConfig, RunConfig, config_differences, saved_config, task_kind
from samopt.train.launch import Ranks, Shard, setup
from samopt.train.lock import DirectoryLock
from samopt.train.optimizers import (
    AMP_MODES,
    ASCEND,
    Amp,
    build_optimizer,
    run_rho,
    sam_rho,
    spec,
    tensor_mask,
    train_step,
)
from samopt.train.task import Loader, Task

__all__ = ["CheckpointError", "device_named", "lr_factor", "progress_bar", "run", "validate"]

CHECKPOINT_FORMAT = 1
#: The entries of a checkpoint and their types (``rng_ranks`` is absent from those written before torchrun runs;
#: ``samopt_version``, the version that wrote it, is not checked).
CHECKPOINT_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "config": dict,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "rng": dict,
    "rng_ranks": (list, type(None)),
    "epoch": int,
    "batch": int,
    "partial": (dict, type(None)),
    "history": list,
    "wall": (int, float),
    "peak": (int, float),
    "device_type": str,
}
#: The largest learning rate, weight decay or momentum the (float32) weights can be multiplied by.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
SCHEDULES = ("cosine", "linear", "multistep", "constant")
EXIT_INTERRUPTED = 130


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run that would continue it."""


def validate(cfg: RunConfig) -> None:
    """Check the settings before any work is done: the shared ones that no library call checks, then the
    optimizer's, by building it over a stand-in model (the global RNG is left as it was)."""
    kind = task_kind(cfg)
    if kind not in spec(cfg.optimizer).tasks:
        raise ValueError(f"optimizer {cfg.optimizer!r} does not run on {kind} tasks")
    if spec(cfg.optimizer).sam_family:
        sam_rho(cfg, kind)
    validation.choice("schedule", cfg.schedule, SCHEDULES)
    validation.choice("amp", cfg.amp, AMP_MODES)
    if cfg.optimizer == "delta-sam" and cfg.estimator == "probe" and cfg.alpha != 0 and cfg.amp != "none":
        raise ValueError(
            f"estimator='probe' (delta-sam's default) cannot run under amp={cfg.amp!r}: its probes move the weights "
            "by rho / sqrt(#parameters), below the rounding of a half-precision forward, and its weights then stray "
            "further from the true per-example norms than SAM's equal weights (docs/benchmarks.md); use "
            "estimator='logit' (or 'exact') or amp='none'"
        )
    validation.choice("sync", cfg.sync, samopt.sam.SYNC_MODES)
    for name in ("epochs", "batch_size", "mask_interval", "num_samples"):
        validation.positive_int(name, getattr(cfg, name))
    for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "gamma"):
        validation.nonnegative(name, getattr(cfg, name))
    for name in ("lr", "weight_decay", "momentum"):
        if getattr(cfg, name) > FLOAT32_MAX:
            raise ValueError(
                f"{name} must be a finite real number in [0, {FLOAT32_MAX:.4g}] (the largest float32, the type of "
                f"the weights it multiplies), got {getattr(cfg, name)!r}"
            )
    validation.unit_interval("label_smoothing", cfg.label_smoothing, include_one=True)
    _validate_ascend(cfg)
    validation.positive_or_none("max_grad_norm", cfg.max_grad_norm)
    _task_module(cfg).validate(cfg)  # the task's own settings (data set, model, ...), without loading anything
    if cfg.warmup_epochs > cfg.epochs:
        raise ValueError(f"warmup_epochs must be at most epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    if sorted(cfg.milestones) != list(cfg.milestones) or any(m < 1 for m in cfg.milestones):
        raise ValueError(f"milestones must be increasing epoch numbers >= 1, got {cfg.milestones}")
    with torch.random.fork_rng(devices=[]):  # the optimizer's own checks (rho, --base, masks, ...) on a stand-in
        stand_in = nn.Sequential(nn.Linear(1, 1), nn.LayerNorm(1))  # a normalisation layer for SAM-ON's mask
        build_optimizer(cfg, stand_in, steps_per_epoch=1, fisher_data=(), kind=kind)


def _validate_ascend(cfg: RunConfig) -> None:
    """The settings of ``--ascend`` (which SAM steps run the perturbed pass)."""
    validation.choice("ascend", cfg.ascend, ASCEND)
    validation.positive_int("ascend_every", cfg.ascend_every)
    validation.unit_interval("ascend_prob", cfg.ascend_prob, include_one=True)
    if cfg.ascend_prob_end is not None:
        validation.unit_interval("ascend_prob_end", cfg.ascend_prob_end, include_one=True)
    validation.unit_interval("ascend_from", cfg.ascend_from, include_one=False)
    validation.finite("ae_lambda1", cfg.ae_lambda1)
    validation.finite("ae_lambda2", cfg.ae_lambda2)
    validation.unit_interval("ae_decay", cfg.ae_decay, include_one=False)
    validation.nonnegative("look_alpha", cfg.look_alpha)
    validation.nonnegative("gsam_alpha", cfg.gsam_alpha)
    if cfg.rho_min is not None:
        validation.nonnegative("rho_min", cfg.rho_min)
    validation.nonnegative("fsam_sigma", cfg.fsam_sigma)
    validation.unit_interval("fsam_lambda", cfg.fsam_lambda, include_one=False)
    if validation.unit_interval("vasso_theta", cfg.vasso_theta, include_one=True) == 0:
        raise ValueError("vasso_theta must be a real number in (0, 1], got 0 (the EMA would never see a gradient)")
    validation.unit_interval("wsam_gamma", cfg.wsam_gamma, include_one=False)
    engine = spec(cfg.optimizer).sam_family and spec(cfg.optimizer).two_pass
    if cfg.adaptive and not engine:
        raise ValueError(
            f"adaptive=True scales the perturbation of a two-pass SAM-family optimizer; {cfg.optimizer!r} has none"
        )
    m = validation.positive_int("ascent_sub_batches", cfg.ascent_sub_batches)
    if m > 1 and (not engine or cfg.optimizer == "delta-sam" or cfg.ascend != "always"):
        raise ValueError(
            f"ascent_sub_batches={m} needs a two-pass SAM-family optimizer other than delta-sam (its weights need "
            f"the whole batch) with ascend='always' (a step that did not ascend would update with the sub-batch's "
            f"gradient); got optimizer={cfg.optimizer!r}, ascend={cfg.ascend!r}"
        )
    if m > cfg.batch_size:
        raise ValueError(f"ascent_sub_batches must be at most batch_size ({cfg.batch_size}), got {m}")
    if cfg.ascend != "always" and not engine:
        raise ValueError(
            f"ascend={cfg.ascend!r} applies to the SAM family's two-pass optimizers; {cfg.optimizer!r} never ascends "
            "a second time"
        )
    validation.choice("granularity", cfg.granularity, GRANULARITIES)
    if cfg.ascend != "always" and tensor_mask(cfg):
        raise ValueError(
            f"ascend={cfg.ascend!r} needs every tensor's clean gradient (a step that does not ascend updates with "
            f"it), which {cfg.optimizer} with a tensor mask does not compute; use ascend='always'"
        )
    if cfg.ascend != "always" and cfg.optimizer == "delta-sam":
        raise ValueError(
            f"ascend={cfg.ascend!r} does not run with delta-sam: its clean gradient is of the reweighted loss, "
            "so a step that did not ascend would descend along it; use ascend='always'"
        )


def _true_weights(opt: torch.optim.Optimizer) -> contextlib.AbstractContextManager[None]:
    """The optimizer's true weights in place (:meth:`samopt.MSAM.true_weights`); a no-op for the others."""
    return opt.true_weights() if isinstance(opt, samopt.MSAM) else contextlib.nullcontext()


def _task_module(cfg: RunConfig) -> Any:
    """The provider (``validate(cfg)`` and ``build_task(cfg, device)``) of ``cfg``'s kind of run."""
    return glue if isinstance(cfg, GlueConfig) else vision


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


def device_named(name: str) -> torch.device:
    """The device of ``--device``: ``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
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
    """SIGINT/SIGTERM while active. ``graceful`` (while training): the first sets a flag checked between steps,
    a second interrupts at once (``KeyboardInterrupt``). Otherwise (before training starts, when there is
    nothing to save yet) each interrupts at once, SIGTERM as Ctrl-C does."""

    def __init__(self, graceful: bool = True) -> None:
        self.graceful = graceful
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if hasattr(signal, "SIGTERM") and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or not self.graceful:
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
    """Write ``path`` through a temporary file of this process that replaces it when complete."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error, or a second Ctrl-C mid-write: the previous file stays, no temporary is left
        tmp.unlink(missing_ok=True)
        raise


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
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        writer = (
            f", written by samopt {ckpt['samopt_version']}"
            if isinstance(ckpt, dict) and "samopt_version" in ckpt
            else ""
        )
        raise CheckpointError(
            f"checkpoint {path} is not a samopt train checkpoint of format {CHECKPOINT_FORMAT} (found {found!r}"
            f"{writer}); this samopt ({samopt.__version__}) reads format {CHECKPOINT_FORMAT}"
        )
    missing = [k for k in CHECKPOINT_ENTRIES if k not in ckpt and k != "rng_ranks"]
    wrong = [
        f"{k!r} is a {type(ckpt[k]).__name__}"
        for k, kind in CHECKPOINT_ENTRIES.items()
        if k in ckpt and (not isinstance(ckpt[k], kind) or (kind is int and isinstance(ckpt[k], bool)))
    ]
    if missing or wrong:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt ({'; '.join([f'no {missing}'] if missing else wrong)}). "
            "Delete it to start over"
        )
    diff = config_differences(ckpt["config"], cfg)
    if ckpt["device_type"] != device.type:
        diff.append(f"device type: saved {ckpt['device_type']!r}, now {device.type!r}")
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was written by a different run; it does not match in "
            + "; ".join(diff)
            + ". Resume with the same settings, or use another --out"
        )
    return ckpt


def _rng_problem(state: object, device: torch.device) -> str | None:
    """Why ``state`` (from :func:`_rng_state`) cannot be restored here, or ``None``; nothing is set."""
    if not isinstance(state, dict) or not torch.is_tensor(state.get("cpu")):
        return "no CPU random state"
    try:
        torch.Generator().set_state(state["cpu"])
    except (RuntimeError, TypeError) as e:
        return f"a bad CPU random state ({e})"
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        mine = torch.cuda.get_rng_state(device)
        if (
            not isinstance(cuda, list)
            or len(cuda) > torch.cuda.device_count()
            or any(not torch.is_tensor(t) or t.dtype != mine.dtype or t.shape != mine.shape for t in cuda)
        ):
            return "a bad CUDA random state"
    return None


def _restore(
    ckpt: dict[str, Any],
    path: Path,
    cfg: RunConfig,
    task: Task,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    amp: Amp,
    ranks: Ranks,
    device: torch.device,
) -> None:
    """Check every part of ``ckpt`` against this run, then load it into the model, optimizer, schedule,
    scaler and RNG. A part that does not fit raises :class:`CheckpointError` saying what differs, before
    anything is loaded into the model."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} {what}: it is corrupt or from another run. Delete it to start over")

    mine = task.model.state_dict()
    saved = ckpt["model"]
    diff = [f"{k}: not in the checkpoint" for k in mine if k not in saved]
    diff += [f"{k}: not in this model" for k in saved if k not in mine]
    diff += [
        f"{k}: checkpoint {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}, now {tuple(mine[k].shape)}"
        for k, v in saved.items()
        if k in mine and (not torch.is_tensor(v) or v.shape != mine[k].shape)
    ]
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise CheckpointError(
            f"checkpoint {path} holds another model ({shown}): was it written for other data (another --data-dir, "
            "with another number of classes) or another model? Resume with the same data, or use another --out"
        )
    steps = len(task.train)
    epoch, batch, partial, history = ckpt["epoch"], ckpt["batch"], ckpt["partial"], ckpt["history"]
    if not 0 <= epoch <= cfg.epochs:
        raise bad(f"is at epoch {epoch}, outside 0..{cfg.epochs}")
    if epoch == cfg.epochs and batch:
        raise bad(f"is at step {batch} after its last epoch ({cfg.epochs})")
    if not 0 <= batch < steps:
        raise bad(f"is at step {batch} of epoch {epoch + 1}, which has steps 0..{steps - 1}")
    tally = {"loss", "correct", "seen", "seconds"}  # and "cpu_seconds" since it is measured
    if (partial is None) != (batch == 0) or (
        partial is not None
        and (set(partial) - {"cpu_seconds"} != tally or not all(isinstance(v, (int, float)) for v in partial.values()))
    ):
        raise bad(f"has a tally of a partial epoch that does not fit its position (step {batch})")
    if len(history) != epoch or not all(isinstance(r, dict) and task.score in r for r in history):
        raise bad(f"has {len(history)} epoch record(s) for {epoch} finished epoch(s)")
    if not (math.isfinite(ckpt["wall"]) and ckpt["wall"] >= 0 and math.isfinite(ckpt["peak"])):
        raise bad(f"has a wall time of {ckpt['wall']} s")
    position = epoch * steps + batch
    if ckpt["scheduler"].get("last_epoch") != position:
        raise bad(f"has its learning-rate schedule at step {ckpt['scheduler'].get('last_epoch')!r}, not {position}")
    per_rank = ckpt.get("rng_ranks")
    rng = per_rank[ranks.rank] if per_rank and len(per_rank) == ranks.world else ckpt["rng"]
    problem = _rng_problem(rng, device)
    if problem:
        raise bad(f"has {problem}")
    scaler_keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    if amp.scaler.is_enabled() and not scaler_keys <= set(ckpt["scaler"]):
        raise bad(f"has no fp16 loss scale (its scaler entry holds {sorted(ckpt['scaler'])})")
    try:
        if not isinstance(opt, samopt.SAM | samopt.MSAM):  # these check their own state before loading it
            validation.optimizer_state(opt, ckpt["optimizer"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        amp.scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise bad(f"holds optimizer or schedule state that does not fit this run ({e})") from None
    with _true_weights(opt):  # MSAM: load w while it is in place; w~ follows from it and the loaded momentum
        task.model.load_state_dict(saved)
    _set_rng_state(rng)


def _rates(work: samopt.Work | None) -> dict[str, float]:
    """Passes per step, the fraction of steps that ascended and extra forwards per step (``None``: a plain
    optimizer, one forward/backward per step)."""
    if work is None:
        return {"passes_per_step": 1.0, "ascent_fraction": 0.0, "forwards_per_step": 0.0}
    return {
        "passes_per_step": work.passes_per_step,
        "ascent_fraction": work.ascent_fraction,
        "forwards_per_step": work.forwards_per_step,
    }


def _work(opt: torch.optim.Optimizer, history: list[dict[str, Any]]) -> dict[str, Any]:
    """An epoch's record of the work its updates did (:attr:`samopt.SAM.work` since the previous epoch's record,
    which keeps the running count, so a resumed epoch counts what it did before the interruption)."""
    if not isinstance(opt, samopt.SAM):
        return _rates(None)
    previous = history[-1].get("work") if history else None
    work = opt.work.copy()
    epoch = work.since(samopt.Work(**previous) if previous else samopt.Work())
    return {**_rates(epoch), "work": dataclasses.asdict(work)}


def _density(opt: torch.optim.Optimizer) -> dict[str, float]:
    """The SAM family's mask density, once there is a mask (it is computed at the first step that ascends)."""
    if not isinstance(opt, samopt.SAM) or (isinstance(opt.mask, samopt.masks.Mask) and opt.mask.masks is None):
        return {}
    return {"mask_density": opt.mask_density()}


def _run_work(opt: torch.optim.Optimizer) -> dict[str, float]:
    """The whole run's :func:`_rates`."""
    return _rates(opt.work if isinstance(opt, samopt.SAM) else None)


def _peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 1024), "process peak RSS"


def _is_metric(key: str) -> bool:
    """Whether an epoch record's ``key`` measures the model (printed, and kept in the summary's ``final``), not
    the position, the schedule, the work counts or the clock and the machine."""
    return key not in ("epoch", "lr", "steps", "work", "train_load_average") and not key.endswith("seconds")


def _load_average() -> float | None:
    """The machine's load over the last minute (runnable processes), where the platform reports it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _mean_of(history: list[dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over the epochs that recorded it, or None when one did not."""
    values = [r.get(key) for r in history]
    return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


class _Tally:
    """Training loss, accuracy and time of an epoch (wall and this process's CPU time), continuing the ``saved`` part
    of an interrupted one."""

    def __init__(self, saved: dict[str, Any] | None, device: torch.device) -> None:
        self.saved = {"cpu_seconds": 0.0, **(saved or {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})}
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen, self.t0, self.cpu0 = 0, time.perf_counter(), time.process_time()

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
            "cpu_seconds": s["cpu_seconds"] + time.process_time() - self.cpu0,
        }


def progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (``total=None``: a counter), or None when ``enabled`` is false or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _sum_over_ranks(snapshot: dict[str, Any], ranks: Ranks, device: torch.device) -> dict[str, Any]:
    """An epoch's tally summed over the ranks (the slowest rank's seconds, the CPU time of every rank)."""
    if ranks.world == 1:
        return snapshot
    values = [snapshot["loss"], snapshot["correct"], snapshot["seen"], snapshot["cpu_seconds"]]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    secs = torch.tensor([snapshot["seconds"]], dtype=torch.float64, device=device)
    D.all_reduce_([t], "sum")
    D.all_reduce_([secs], "max")
    return {
        "loss": float(t[0]),
        "correct": int(t[1]),
        "seen": int(t[2]),
        "seconds": float(secs),
        "cpu_seconds": float(t[3]),
    }


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


def _diverged(e: samopt.NonFiniteGradientError, epoch: int, batch: int, step: int) -> FloatingPointError:
    """The run's error for ``e``, raised at ``batch`` (1-based, in ``epoch``, 0-based) and optimizer step ``step``:
    it names the step that was non-finite, which a deferred check reports later."""
    where = batch if e.step is None else batch - (step - e.step)
    return FloatingPointError(
        f"the training diverged in epoch {epoch + 1}, step {where} ({str(e).split(';')[0]}); lower --lr, --rho"
    )


def _release_frames() -> None:
    """Free what the finished training held (the DDP wrapper and its reference to the process group), also when an
    exception's traceback still holds the frames, so that the group is torn down by ``destroy_process_group`` and not
    at interpreter exit, where gloo can abort the process after a clean run."""
    exc = sys.exc_info()[1]
    if exc is not None:
        traceback.clear_frames(exc.__traceback__)  # the finished frames below this one; lines stay printable
    gc.collect()  # modules with hooks are reference cycles


def plan(cfg: RunConfig, steps_per_epoch: int, device: torch.device, resumed: int | None = None) -> str:
    """One line that says what a run of ``cfg`` will do (with the rho a SAM-family optimizer will use), printed
    before it trains, and the flags that change it; ``resumed``: the steps left to a resumed run, whose settings
    are its checkpoint's."""
    glue = isinstance(cfg, GlueConfig)
    what = f"GLUE {cfg.task}" if glue else cfg.dataset  # type: ignore[attr-defined]
    rho = run_rho(cfg, task_kind(cfg))
    optimizer = cfg.optimizer if rho is None else f"{cfg.optimizer} at rho {rho:g}"
    steps = cfg.epochs * steps_per_epoch

    def count(n: int, noun: str) -> str:
        return f"{n:,} {noun}{'' if n == 1 else 's'}"

    line = (
        f"plan: {what}, {cfg.model}, {optimizer}: {count(cfg.epochs, 'epoch')} x {count(steps_per_epoch, 'step')} "  # type: ignore[attr-defined]
        f"of batch {cfg.batch_size} = {count(steps, 'step')} on {device}; results in {cfg.out or cfg.default_out()}"
    )
    if resumed is not None:
        return line + f" (resumed: {resumed:,} of {steps:,} steps left)"
    return line + f" ({'--epochs or --train-subset' if glue else '--epochs, --model or --recipe'} change it)"


#: The steps after which a run prints its measured time per step and the time its training steps will take.
ESTIMATE_AFTER = 10


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes} min" if minutes < 90 else f"{seconds / 3600:.1f} h"


def dry_run(cfg: RunConfig) -> dict[str, Any]:
    """Check ``cfg``, load its data and build its model, and print its plan (:func:`plan`) without training or
    writing anything; returns ``{"plan": line, "steps_per_epoch": n}``."""
    validate(cfg)
    device = device_named(setup(cfg.device)[1])
    task = _task_module(cfg).build_task(cfg, device)
    line = plan(cfg, len(task.train), device)
    print(line)
    return {"plan": line, "steps_per_epoch": len(task.train)}


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train as ``cfg`` says (see the module docstring); returns the summary also written to ``summary.json``.

    A :class:`~samopt.train.config.TrainConfig` trains an image classifier, a
    :class:`~samopt.train.config.GlueConfig` fine-tunes on a GLUE task. Exits with
    :data:`EXIT_INTERRUPTED` (``SystemExit``) after saving a checkpoint when interrupted while
    training; an interrupt before training starts, or a second one, raises ``KeyboardInterrupt``.
    Under ``torchrun`` it joins the ranks' process group first and leaves it at the end.
    """
    validate(cfg)
    joined = not (dist.is_available() and dist.is_initialized())
    ranks, device_name = setup(cfg.device)
    joined = joined and ranks.world > 1
    together = False  # whether every rank leaves together (a normal end, or a stop all ranks agreed on)
    try:
        with _Interrupt(graceful=False):
            summary = _run(cfg, ranks, device_named(device_name))
        together = True
        return summary
    except SystemExit:
        together = True
        raise
    finally:
        if joined:
            if together:
                ranks.barrier()  # no rank tears the group down while another still talks to it
            _release_frames()
            dist.destroy_process_group()


def _run(cfg: RunConfig, ranks: Ranks, device: torch.device) -> dict[str, Any]:
    for name in ("batch_size", "num_samples") if spec(cfg.optimizer).fisher else ("batch_size",):
        if getattr(cfg, name) % ranks.world:
            raise ValueError(
                f"{name} ({getattr(cfg, name)}) must be a multiple of the number of ranks ({ranks.world}): "
                "each rank takes an equal share"
            )
    out = Path(cfg.out or cfg.default_out())
    lock = DirectoryLock(out)  # rank 0 writes; it alone holds the lock, for the whole run
    error: BaseException | None = None
    if ranks.main:
        try:
            lock.acquire()
            for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):  # left by a process killed mid-write
                for stale in out.glob(f"{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
        except (RuntimeError, OSError) as e:
            error = e
    error = _from_main(error, ranks)
    if error is not None:
        raise error
    try:
        return _train(cfg, ranks, device, out)
    finally:
        lock.release()


def _train(cfg: RunConfig, ranks: Ranks, device: torch.device, out: Path) -> dict[str, Any]:
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    amp = Amp(cfg.amp, device)
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
    if task.fisher is not None and cfg.num_samples > len(task.fisher) * cfg.batch_size:
        raise ValueError(
            f"num_samples must be between 1 and {len(task.fisher) * cfg.batch_size} (the training examples SSAM-F's "
            f"Fisher information is taken from), got {cfg.num_samples}"
        )
    train = Shard(task.train, ranks)
    fisher = _FisherStream(Shard(task.fisher, ranks)) if task.fisher is not None else None
    ddp = None
    if ranks.world > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net: nn.Module = model if ddp is None else ddp
    opt = build_optimizer(
        cfg, model, steps_per_epoch, fisher, task.loss_fn, ddp=ddp, world=ranks.world, kind=task_kind(cfg)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))

    state: dict[str, Any] = {"epoch": 0, "batch": 0, "history": [], "partial": None, "wall": 0.0, "peak": 0.0}
    if ckpt is not None:
        _restore(ckpt, ckpt_path, cfg, task, opt, sched, amp, ranks, device)
        state = {k: ckpt[k] for k in state}
    metrics_path = out / "metrics.jsonl"
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(metrics_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in state["history"]), "w")

    def save(epoch: int, batch: int, partial: dict[str, Any] | None, wall: float) -> None:
        rngs: list[Any] = [_rng_state()]
        if ranks.world > 1:
            rngs = [None] * ranks.world
            dist.all_gather_object(rngs, _rng_state())
        if not ranks.main:
            return
        with _true_weights(opt):  # MSAM: save the true weights, while they are in place
            payload = {
                "format": CHECKPOINT_FORMAT,
                "samopt_version": samopt.__version__,
                "config": saved_config(cfg),
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
    left = cfg.epochs * steps_per_epoch - state["epoch"] * steps_per_epoch - state["batch"]
    if ranks.main:
        print(plan(cfg, steps_per_epoch, device, left if ckpt is not None else None), flush=True)
    taken, began = 0, time.perf_counter()
    wall0 = time.perf_counter() - state["wall"]
    label = f"{cfg.optimizer} s{cfg.seed}"
    with _Interrupt() as interrupt:
        for epoch in range(state["epoch"], cfg.epochs):
            resumed = epoch == state["epoch"]
            start = state["batch"] if resumed else 0
            # the saved part of an interrupted epoch is already summed over the ranks: rank 0 carries it
            tally = _Tally(state["partial"] if resumed and ranks.main else None, device)
            bar = progress_bar(
                steps_per_epoch, start, f"epoch {epoch + 1}/{cfg.epochs} {label}", cfg.progress and ranks.main
            )
            model.train()
            batch = start
            for x, y in train.epoch(epoch, start):
                try:
                    loss, logits = train_step(opt, net, task.prepare(x), y, task.loss_fn, amp, cfg.max_grad_norm)
                except samopt.NonFiniteGradientError as e:
                    raise _diverged(e, epoch, batch + 1, cast(samopt.SAM, opt).work.steps + 1) from e
                lr = opt.param_groups[0]["lr"]
                sched.step()
                tally.add(loss, logits, y[: len(logits)], task.classification)  # a sub-batch's clean pass: its rows
                batch += 1
                taken += 1
                if taken == ESTIMATE_AFTER and ranks.main and left > taken:
                    per_step = (time.perf_counter() - began) / taken
                    (bar.write if bar is not None else print)(
                        f"{per_step:.3g} s per step over the first {taken}: about {_duration(per_step * left)} for "
                        f"the {left:,} training steps (evaluation not counted)"
                    )
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
            if isinstance(opt, samopt.SAM):
                try:
                    opt.check_finite()  # a step skipped on the device and not reported yet
                except samopt.NonFiniteGradientError as e:
                    raise _diverged(e, epoch, batch, opt.work.steps) from e
            done = _sum_over_ranks(tally.snapshot(), ranks, device)
            if not math.isfinite(done["loss"]):
                raise FloatingPointError(f"the training loss became non-finite in epoch {epoch + 1}; lower --lr, --rho")
            record = None
            if ranks.main:
                with _true_weights(opt):  # MSAM's weights rest at w~ between steps: evaluate w
                    metrics = task.evaluate(model, amp)
                record = {"epoch": epoch + 1, "train_loss": done["loss"] / done["seen"]}
                if task.classification:
                    record["train_acc"] = done["correct"] / done["seen"]
                record.update(metrics)
                record.update({"lr": lr, "train_seconds": done["seconds"], "steps": steps_per_epoch})  # last step's lr
                # CPU time is what the run did, wall time also what else the machine did: its load says how much
                record.update({"train_cpu_seconds": done["cpu_seconds"], "train_load_average": _load_average()})
                record.update(_work(opt, state["history"]))
                record.update(_density(opt))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            record = _from_main(record, ranks)
            state["history"].append(record)
            save(epoch + 1, 0, None, time.perf_counter() - wall0)
            if ranks.main:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if _is_metric(k))
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
        "final": {k: v for k, v in history[-1].items() if _is_metric(k)},
        "wall_seconds": time.perf_counter() - wall0,
        "seconds_per_epoch": sum(r["train_seconds"] for r in history) / len(history),
        "seconds_per_step": sum(r["train_seconds"] for r in history) / sum(r["steps"] for r in history),
        # runs from before CPU time was recorded have none
        "cpu_seconds_per_epoch": _mean_of(history, "train_cpu_seconds"),
        "load_average": _mean_of(history, "train_load_average"),
        **_run_work(opt),
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "device": str(device),
        "ranks": ranks.world,
        "out": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
        "config": saved_config(cfg),
    }
    if ranks.main:
        _atomic_write(out / "summary.json", lambda f: json.dump(summary, f, indent=1), "w")
    return summary
