"""``samopt sharpness``: the sharpness of a finished run's weights, written into its ``summary.json``.

The measures are those of :mod:`samopt.diagnostics` on the run's training loss: the
first ``examples`` examples of its first training epoch (the run's own shuffling,
augmentation and label noise, all seeded), in batches of ``m``; BatchNorm in the chosen
mode (``train``: batch statistics, by default for image runs; ``eval``: running
statistics, by default for GLUE runs, where eval mode also turns off the attention's
dropout). Each measure is stored under ``summary["sharpness"][measure]`` with the
settings it was taken with, so that a comparison can check that its runs agree.

Example::

    samopt sharpness runs/noisy/sam-s0 --measures eigenvalue,trace,m-sharpness --examples 1024 --m 128
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samopt import diagnostics
from samopt.train import glue, vision
from samopt.train.config import GlueConfig, RunConfig, TrainConfig, flag
from samopt.train.loop import CHECKPOINT_FORMAT, device_named, progress_bar
from samopt.train.task import Task

__all__ = [
    "LANDSCAPE_ALPHAS",
    "MEASURES",
    "Settings",
    "bn_mode",
    "interpolate_runs",
    "landscape_curves",
    "line_between",
    "load_run",
    "loss_of",
    "measure",
    "plot_curves",
    "plot_plane",
    "run_landscape",
    "training_batches",
]

#: ``--autocast``: the precision of the measures' forward passes.
AUTOCAST = {"none": None, "bf16": torch.bfloat16}
#: Coordinates along a filter-normalised direction (1: a step as large as the weights, filter by filter).
LANDSCAPE_ALPHAS = [i / 10 for i in range(-10, 11)]
#: Coordinates along the line between two solutions (0: the first, 1: the second).
LINE_ALPHAS = [i / 10 for i in range(-3, 14)]

#: The measures of ``--measures``: what each reports.
MEASURES = {
    "eigenvalue": "the largest Hessian eigenvalue(s), power iteration (--top-k, --tol, --max-iter)",
    "trace": "the Hessian trace, Hutchinson with Rademacher probes (--probes), with its standard error",
    "m-sharpness": "worst-case adaptive m-sharpness in an L2 or L-infinity ball (--rho, --norm, --steps)",
    "average-sharpness": "mean loss increase under adaptive Gaussian weight noise (--sigma, --samples)",
}


@dataclass(frozen=True)
class Settings:
    """How ``samopt sharpness`` measures; see :mod:`samopt.diagnostics` for each argument."""

    measures: tuple[str, ...] = ("eigenvalue", "trace", "m-sharpness")
    examples: int = 1024
    m: int = 128
    bn: str | None = None  # None: "train" for image runs, "eval" for GLUE runs
    top_k: int = 1
    tol: float = 1e-3
    max_iter: int = 100
    probes: int = 30
    trace_estimator: str = "hutchinson"
    rho: float = 0.05
    norm: str = "l2"
    steps: int = 20
    sigma: float = 0.01
    samples: int = 10
    seed: int = 0
    device: str = "auto"
    autocast: str = "none"  # or "bf16": the forward passes under torch.autocast in bfloat16
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [name for name in self.measures if name not in MEASURES]
        if unknown or not self.measures:
            raise ValueError(f"unknown measure(s) {unknown} in --measures; choose from: {', '.join(MEASURES)}")
        for name in ("examples", "m", "top_k", "max_iter", "probes", "steps", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(name)} must be an integer >= 1, got {value!r}")
        for name in ("tol", "rho", "sigma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a finite number > 0, got {value!r}")
        if self.m > self.examples:
            raise ValueError(f"--m ({self.m}) must be at most --examples ({self.examples}): m is the batch size")
        if self.bn not in (None, *diagnostics.BN_MODES):
            raise ValueError(f"--bn must be one of {', '.join(diagnostics.BN_MODES)}, got {self.bn!r}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"--autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")
        if self.trace_estimator not in diagnostics.TRACE_ESTIMATORS:
            raise ValueError(
                f"--trace-estimator must be one of {', '.join(diagnostics.TRACE_ESTIMATORS)}, "
                f"got {self.trace_estimator!r}"
            )
        if self.trace_estimator == "hutch++" and (self.probes % 3 or self.probes < 6):
            raise ValueError(
                f"--probes must be a multiple of 3 and at least 6 with --trace-estimator hutch++, got {self.probes}"
            )
        if self.norm not in diagnostics.NORMS:
            raise ValueError(f"--norm must be one of {', '.join(diagnostics.NORMS)}, got {self.norm!r}")


def load_run(run_dir: Path, device: torch.device) -> tuple[RunConfig, Task, dict[str, Any]]:
    """The settings, task (with the run's final weights loaded) and summary of the finished run in ``run_dir``."""
    ckpt_path, summary_path = run_dir / "checkpoint.pt", run_dir / "summary.json"
    if not ckpt_path.exists():
        raise ValueError(
            f"{run_dir} holds no checkpoint.pt: point samopt sharpness at the --out folder of a samopt train or "
            "samopt glue run"
        )
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{ckpt_path} cannot be read ({type(e).__name__}); it is corrupt or not a checkpoint") from e
    if (
        not isinstance(ckpt, dict)
        or ckpt.get("format") != CHECKPOINT_FORMAT
        or not isinstance(ckpt.get("config"), dict)
    ):
        raise ValueError(f"{ckpt_path} is not a samopt checkpoint of format {CHECKPOINT_FORMAT}")
    kind: type[RunConfig] = GlueConfig if "task" in ckpt["config"] else TrainConfig
    names = {f.name for f in dataclasses.fields(kind)}
    cfg = kind(**{k: v for k, v in ckpt["config"].items() if k in names})
    if ckpt["epoch"] < cfg.epochs or not summary_path.exists():
        raise ValueError(
            f"the run in {run_dir} stopped at epoch {ckpt['epoch']} of {cfg.epochs}: finish it first (the same "
            "command with --resume); samopt sharpness measures a run's final weights"
        )
    task = (glue if isinstance(cfg, GlueConfig) else vision).build_task(cfg, device)
    task.model.load_state_dict(ckpt["model"])
    return cfg, task, json.loads(summary_path.read_text())


def _stack(parts: list[Tensor]) -> Tensor:
    """Concatenate along the batch; GLUE's token tensors, padded per batch, are padded to the longest with 0
    (the pad id, attention mask and token type 0)."""
    length = max(p.shape[-1] for p in parts)
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        parts = [F.pad(p, (0, length - p.shape[-1])) for p in parts]
    return torch.cat(parts)


def training_batches(task: Task, examples: int, m: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``examples`` examples of the run's first training epoch, in batches of ``m`` (a last, smaller
    batch is dropped, so that every batch has m examples)."""
    xs, ys, seen = [], [], 0
    for x, y in task.train.epoch(0):
        xs.append(x)
        ys.append(y)
        seen += len(y)
        if seen >= examples:
            break
    if seen < examples:
        raise ValueError(f"--examples ({examples}) must be at most the run's training examples ({seen})")
    x, y = _stack(xs)[:examples], torch.cat(ys)[:examples]
    return [(x[i : i + m], y[i : i + m]) for i in range(0, examples - m + 1, m)]


def loss_of(task: Task) -> Callable[[nn.Module, Any], Tensor]:
    """The task's training loss as :mod:`samopt.diagnostics` takes it: ``loss_fn(model, (inputs, targets))``."""

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return task.loss_fn(model(task.prepare(batch[0])), batch[1])

    return loss_fn


def bn_mode(s: Settings, cfg: RunConfig) -> str:
    """``--bn``, or by default ``eval`` for GLUE runs (their attention dropout follows the mode) and ``train``."""
    return s.bn or ("eval" if isinstance(cfg, GlueConfig) else "train")


@contextlib.contextmanager
def _ticks(total: int | None, desc: str, enabled: bool) -> Iterator[Callable[[int], Any] | None]:
    """A progress bar's ``update`` for the measures' ``progress=`` (None when off), closed on leaving."""
    bar = progress_bar(total, 0, desc, enabled)
    try:
        yield None if bar is None else bar.update
    finally:
        if bar is not None:
            bar.close()


def _common(s: Settings, bn: str) -> dict[str, Any]:
    """The settings every measure depends on: the examples (whole batches of m), BatchNorm mode and seed."""
    return {"examples": s.examples // s.m * s.m, "m": s.m, "bn": bn, "seed": s.seed, "autocast": s.autocast}


def _recorded(name: str, s: Settings, bn: str) -> dict[str, Any]:
    """The settings a measure's value depends on, as stored beside it."""
    own: dict[str, dict[str, Any]] = {
        "eigenvalue": {"top_k": s.top_k, "tol": s.tol, "max_iter": s.max_iter},
        "trace": {"probes": s.probes, "estimator": s.trace_estimator},
        "m-sharpness": {"rho": s.rho, "norm": s.norm, "adaptive": True, "steps": s.steps},
        "average-sharpness": {"sigma": s.sigma, "samples": s.samples, "adaptive": True},
    }
    return _common(s, bn) | own[name]


def _one(name: str, task: Task, batches: list[Any], bn: str, s: Settings, label: str) -> dict[str, Any]:
    """One measure on the task's model, timed, with the settings it depends on."""
    model, loss_fn = task.model, loss_of(task)
    t0 = time.perf_counter()
    with _ticks(None, f"{label} {name}", s.progress) as tick:
        common: dict[str, Any] = {"bn": bn, "autocast": AUTOCAST[s.autocast], "seed": s.seed, "progress": tick}
        if name == "eigenvalue":
            eig = diagnostics.top_eigenvalues(
                model, loss_fn, batches, k=s.top_k, tol=s.tol, max_iter=s.max_iter, **common
            )
            result: dict[str, Any] = {"value": eig.values[0], **dataclasses.asdict(eig)}
        elif name == "trace":
            est = diagnostics.hessian_trace(
                model, loss_fn, batches, probes=s.probes, estimator=s.trace_estimator, **common
            )
            result = dataclasses.asdict(est)
        elif name == "m-sharpness":
            sharp = diagnostics.m_sharpness(model, loss_fn, batches, rho=s.rho, norm=s.norm, steps=s.steps, **common)
            result = dataclasses.asdict(sharp)
        else:
            avg = diagnostics.average_sharpness(model, loss_fn, batches, sigma=s.sigma, samples=s.samples, **common)
            result = dataclasses.asdict(avg)
    return result | {"seconds": time.perf_counter() - t0, "settings": _recorded(name, s, bn)}


def measure(run_dir: Path, s: Settings, *, again: bool = True) -> dict[str, Any]:
    """Measure the finished run in ``run_dir`` and write each measure into its ``summary.json``; returns them.

    With ``again=False``, a measure already stored with the same settings is returned as stored.
    """
    device = device_named(s.device)
    cfg, task, summary = load_run(run_dir, device)
    bn = bn_mode(s, cfg)
    stored = summary.get("sharpness", {})
    todo = [n for n in s.measures if again or stored.get(n, {}).get("settings") != _recorded(n, s, bn)]
    if todo:
        batches = training_batches(task, s.examples, s.m)
        label = f"{cfg.optimizer} s{cfg.seed}"
        stored = stored | {name: _one(name, task, batches, bn, s, label) for name in todo}
    summary["sharpness"] = stored
    _write_json(run_dir / "summary.json", summary)
    return {name: stored[name] for name in s.measures}


def _around(cfg: RunConfig, task: Task, s: Settings, dims: int, alphas: list[float]) -> diagnostics.Landscape:
    """The training loss on the 1-D or 2-D grid ``alphas`` around the task's weights, along random
    filter-normalised directions (seeds ``s.seed``, ``s.seed + 1``)."""
    batches = training_batches(task, s.examples, s.m)
    directions = [diagnostics.filter_normalized_direction(task.model, seed=s.seed + k) for k in range(dims)]
    with _ticks(len(alphas) ** dims, f"{cfg.optimizer} s{cfg.seed} landscape", s.progress) as tick:
        return diagnostics.landscape(
            task.model,
            loss_of(task),
            batches,
            directions,
            alphas,
            bn=bn_mode(s, cfg),
            autocast=AUTOCAST[s.autocast],
            progress=tick,
        )


def landscape_curves(run_dirs: dict[str, Path], alphas: list[float], s: Settings) -> dict[str, diagnostics.Landscape]:
    """Per labelled run, the training loss along a random filter-normalised direction through its weights (Li et
    al., NeurIPS 2018), each run with the same seed of direction."""
    device = device_named(s.device)
    curves = {}
    for label, run_dir in run_dirs.items():
        cfg, task, _ = load_run(run_dir, device)
        curves[label] = _around(cfg, task, s, 1, alphas)
    return curves


def plot_curves(curves: dict[str, diagnostics.Landscape], path: Path, title: str, xlabel: str | None = None) -> Path:
    """One curve of training loss per label (a 1-D landscape or a line between solutions), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in curves.items():
        ax.plot(curve.alphas, curve.loss, marker="o", markersize=3, label=name)
    ax.set(xlabel=xlabel or "step along a random filter-normalised direction (Li et al., 2018)", ylabel="training loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_plane(plane: diagnostics.Landscape, path: Path, title: str) -> Path:
    """A 2-D landscape as filled contours of the training loss, the solution marked at the origin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    filled = ax.contourf(plane.alphas, plane.betas, plane.loss, levels=20, cmap="viridis")
    ax.contour(plane.alphas, plane.betas, plane.loss, levels=20, colors="white", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label="training loss")
    ax.plot([0], [0], marker="*", color="red", markersize=10)
    ax.set(xlabel="direction 1 (filter-normalised)", ylabel="direction 2 (filter-normalised)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file, so that a reader never sees half of it."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_landscape(run_dir: Path, s: Settings, dims: int, span: float = 1.0, points: int = 21) -> Path:
    """The 1-D or 2-D landscape of a finished run around its final weights, written into ``run_dir`` as
    ``landscape-<dims>d.json`` (coordinates and losses) and ``landscape-<dims>d.png``; returns the PNG's path."""
    if dims not in (1, 2):
        raise ValueError(f"--landscape must be 1d or 2d, got {dims}d")
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"--landscape-span must be a finite number > 0, got {span!r}")
    if points < 2:
        raise ValueError(f"--landscape-points must be an integer >= 2, got {points}")
    cfg, task, _ = load_run(run_dir, device_named(s.device))
    alphas = [span * (2 * i / (points - 1) - 1) for i in range(points)]
    result = _around(cfg, task, s, dims, alphas)
    name = f"landscape-{dims}d"
    _write_json(run_dir / f"{name}.json", dataclasses.asdict(result) | {"settings": _common(s, bn_mode(s, cfg))})
    title = f"{cfg.optimizer} seed {cfg.seed}: training loss around the solution"
    if dims == 1:
        return plot_curves({f"{cfg.optimizer} s{cfg.seed}": result}, run_dir / f"{name}.png", title)
    return plot_plane(result, run_dir / f"{name}.png", title)


def line_between(run_dir: Path, other: Path, s: Settings, alphas: list[float]) -> diagnostics.Landscape:
    """The training loss (``run_dir``'s data) at ``alphas`` on the line from ``run_dir``'s final weights (0) to
    ``other``'s (1)."""
    device = device_named(s.device)
    cfg, task, _ = load_run(run_dir, device)
    _, other_task, _ = load_run(other, device)
    batches = training_batches(task, s.examples, s.m)
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    try:
        return diagnostics.interpolation(
            task.model,
            loss_of(task),
            batches,
            start,
            other_task.model.state_dict(),
            alphas,
            bn=bn_mode(s, cfg),
            autocast=AUTOCAST[s.autocast],
        )
    except ValueError as e:
        raise ValueError(f"--interpolate: {other} holds another model than {run_dir} ({e})") from None


def interpolate_runs(run_dir: Path, other: Path, s: Settings) -> Path:
    """:func:`line_between` the two runs, written into ``run_dir`` as ``line-to-<other>.json`` and ``.png``;
    returns the PNG's path."""
    line = line_between(run_dir, other, s, LINE_ALPHAS)
    name = f"line-to-{other.resolve().name}"
    _write_json(run_dir / f"{name}.json", dataclasses.asdict(line) | {"from": str(run_dir), "to": str(other)})
    xlabel = f"alpha: (1 - alpha) * {run_dir.name} + alpha * {other.resolve().name}"
    return plot_curves({f"{run_dir.name} to {other.resolve().name}": line}, run_dir / f"{name}.png", "", xlabel)
