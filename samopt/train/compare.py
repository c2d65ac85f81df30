"""``samopt compare``: several optimizers times several seeds, then a table and plots.

Each run is a separate ``samopt train`` process, so that its peak memory is its own
and a crash or Ctrl-C costs one run at most: a run whose ``summary.json`` exists is
skipped and one with a checkpoint is resumed, so re-running the same command
continues an interrupted comparison. The run process lives in its own process group:
Ctrl-C, SIGINT or SIGTERM to ``samopt compare`` is passed on to it once (so it
finishes its step, saves and exits, and a second one stops it at once), and if
``samopt compare`` is killed outright the run gets SIGTERM (on Linux). ``--out`` is
locked for the life of the comparison, as each run locks its own directory.

The results go to ``--out`` (default ``runs/compare``): ``compare.md`` (the table: mean
± std over seeds of the final and best score and the epoch of the best, the other
metrics, time and memory relative to SGD), ``compare.csv`` (one row per run, for
plotting elsewhere), ``compare.json`` (every run's summary), ``accuracy.png`` (per epoch,
for every optimizer: the evaluation score and loss and, with label noise, how much of
the noise the model has fitted; mean with a min-max band over seeds) and ``cost.png``
(final score against time per epoch relative to SGD). With ``--sharpness``, each run's
sharpness is measured after it (see :mod:`samopt.train.sharpness`; stored in its
``summary.json``, and measured once), the table gains a column per measure, and
``landscape.png`` draws the training loss along a random filter-normalised direction
through each optimizer's solution (its first seed).

Example::

    samopt compare --recipe fmnist-demo --optimizers sgd,sam,ssam-f --seeds 3
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from samopt.train.config import GlueConfig, TrainConfig, config_differences, resolve, to_flags
from samopt.train.lock import DirectoryLock
from samopt.train.loop import EXIT_INTERRUPTED, validate
from samopt.train.optimizers import NAMES
from samopt.train.sharpness import LANDSCAPE_ALPHAS, Settings, landscape_curves, measure, plot_curves

__all__ = ["compare", "mean_std", "plot", "reading", "rows", "table", "write_csv"]

_SHARPNESS_COLUMNS = {"eigenvalue": "top eigenvalue", "trace": "Hessian trace", "m-sharpness": "m-sharpness"}


def mean_std(values: list[float], scale: float = 1.0, spec: str = ".2f", spread: str | None = None) -> str:
    """``mean ± std`` of ``values`` times ``scale``, the mean formatted with ``spec`` and the spread with ``spread``
    (default: ``spec``); just the value for one seed, which has no spread to show."""
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:{spec}}"
    return f"{m:{spec}} ± {statistics.stdev(values) * scale:{spread or spec}}"


def _best_epoch(summary: dict[str, Any]) -> int:
    """The (first) epoch of the best score."""
    scores = [r[summary["score"]] for r in summary["history"]]
    return scores.index(max(scores)) + 1


def _reference(results: dict[str, list[dict[str, Any]]]) -> tuple[str, float]:
    """The optimizer costs are relative to (SGD, else the first one) and its mean time per epoch."""
    name = "sgd" if "sgd" in results else next(iter(results))
    return name, statistics.mean(r["seconds_per_epoch"] for r in results[name])


def _other_metrics(summary: dict[str, Any]) -> list[str]:
    """The evaluation metrics of a run besides its score (e.g. MRPC's F1), from its last epoch."""
    final = summary["final"]
    skip = {summary["score"], "mask_density", "passes_per_step", "ascent_fraction", "forwards_per_step"}
    return [k for k in final if k not in skip and not k.startswith("train_") and not k.endswith("loss")]


def _passes(runs: list[dict[str, Any]]) -> str:
    """Forward/backward passes per step (mean over seeds), with the extra forward-only passes if any; "n/a" for
    runs that did not count them."""
    if any("passes_per_step" not in r for r in runs):
        return "n/a"
    text = f"{statistics.mean(r['passes_per_step'] for r in runs):.2f}"
    forwards = statistics.mean(r["forwards_per_step"] for r in runs)
    return text + (f" + {forwards:.1f} fwd" if forwards else "")


def _measured(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The sharpness measures every run holds."""
    runs = [r for group in results.values() for r in group]
    names = list(runs[0].get("sharpness", {}))
    return [n for n in names if all(n in r.get("sharpness", {}) for r in runs)]


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown table of per-run ``summary.json`` dicts grouped by optimizer (mean ± std over seeds).

    Time per epoch and peak memory are also given relative to SGD's when SGD is among the optimizers, else to
    the first one's; the sharpness measures every run holds get a column each.
    """
    ref_name, ref = _reference(results)
    ref_memory = statistics.mean(r["peak_memory_mib"] for r in results[ref_name])
    first = next(iter(results.values()))[0]
    kind, score = first["peak_memory_kind"], first["score"].replace("_", " ")
    others = _other_metrics(first)
    extra = "".join(f" final {m.replace('_', ' ')} % |" for m in others)
    measured = _measured(results)
    extra += "".join(f" {_SHARPNESS_COLUMNS.get(m, m.replace('-', ' '))} |" for m in measured)
    ref_cpu = _cpu(results[ref_name])
    lines = [
        f"| optimizer | seeds | final {score} % | best {score} % | best epoch |{extra} wall time s | s/epoch | "
        f"x {ref_name} | CPU s/epoch | x {ref_name} (CPU) | passes/step | peak memory MiB ({kind}) | x {ref_name} |",
        "|---" * (13 + len(others) + len(measured)) + "|",
    ]
    for name, runs in results.items():
        spe = [r["seconds_per_epoch"] for r in runs]
        memory = statistics.mean(r["peak_memory_mib"] for r in runs)
        cells = "".join(f" {mean_std([r['final'][m] for r in runs], 100)} |" for m in others)
        cells += "".join(
            f" {mean_std([r['sharpness'][m]['value'] for r in runs], spec='.3g', spread='.2g')} |" for m in measured
        )
        lines.append(
            f"| {name} | {len(runs)} | {mean_std([r['final_score'] for r in runs], 100)} | "
            f"{mean_std([r['best_score'] for r in runs], 100)} | "
            f"{mean_std([_best_epoch(r) for r in runs], spec='.0f')} of {runs[0]['epochs']} |{cells} "
            f"{statistics.mean(r['wall_seconds'] for r in runs):.0f} | {statistics.mean(spe):.1f} | "
            f"{statistics.mean(spe) / ref:.2f} | {_ratio(_cpu(runs), None, '.1f')} | {_ratio(_cpu(runs), ref_cpu)} | "
            f"{_passes(runs)} | {memory:.0f} | {memory / ref_memory:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _cpu(runs: list[dict[str, Any]]) -> float | None:
    """The mean CPU seconds per epoch of ``runs``, None if one of them did not record it."""
    values = [r.get("cpu_seconds_per_epoch") for r in runs]
    return None if any(v is None for v in values) else statistics.mean(values)  # type: ignore[type-var]


def _ratio(value: float | None, ref: float | None, spec: str = ".2f") -> str:
    if value is None or (ref is not None and not ref):
        return "n/a"
    return f"{value / (ref or 1.0):{spec}}"


def reading(results: dict[str, list[dict[str, Any]]]) -> str:
    """A paragraph that says how to read :func:`table`'s numbers for these ``results``, and what they do not show."""
    ref_name, _ = _reference(results)
    first = next(iter(results.values()))[0]
    score = first["score"].replace("_", " ")
    seeds = min(len(runs) for runs in results.values())
    means = {name: statistics.mean(r["final_score"] for r in runs) for name, runs in results.items()}
    top = max(means, key=means.__getitem__)
    text = [
        f"How to read this: one row per optimizer; the final {score} is the last epoch's and the best is the best "
        "epoch's, picked on the evaluation set and so optimistic."
    ]
    if seeds > 1:
        spread = max(statistics.stdev([r["final_score"] for r in runs]) for runs in results.values())
        compared = f"One optimizer, so nothing is compared; its seed spread is {100 * spread:.2f} points."
        if len(results) > 1:
            gap = means[top] - means[ref_name]
            verdict = "more than" if gap > 2 * spread else "not more than"
            compared = (
                f"The highest final {score} is {top}'s, {100 * gap:+.2f} points from {ref_name}'s: {verdict} twice "
                f"the largest seed spread ({100 * spread:.2f} points)."
            )
        text.append(f"Each figure is the mean ± standard deviation over {seeds} seeds. {compared}")
    elif len(results) == 1:
        text.append("One seed and one optimizer: nothing is compared and no spread is measured; --seeds 3 measures it.")
    else:
        text.append(
            f"One seed: no spread is measured, so no difference here is shown to be more than chance (the highest "
            f"final {score} is {top}'s); --seeds 3 measures it."
        )
    if "flipped_acc_noisy" in first["final"]:
        text.append(
            "The flipped columns are the training images whose label was replaced: predicted as their wrong label "
            "(memorised noise) and as their true one."
        )
    loads = [r["load_average"] for runs in results.values() for r in runs if r.get("load_average") is not None]
    load = f" (the machine's load average during the runs: {min(loads):.1f} to {max(loads):.1f})" if loads else ""
    text.append(
        f"Times are relative to {ref_name} in this comparison. Wall time also counts whatever else the machine "
        f"ran{load}; CPU time counts this process's work, so its ratio is the steadier one on a shared machine."
    )
    return " ".join(text) + "\n"


def rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run, the numbers of its summary: what ``compare.csv`` holds."""
    out = []
    for name, runs in results.items():
        for r in runs:
            row = {"optimizer": name, "seed": r["seed"], "epochs": r["epochs"], "score": r["score"]}
            row |= {"final_score": r["final_score"], "best_score": r["best_score"], "best_epoch": _best_epoch(r)}
            row |= {f"final_{m}": r["final"][m] for m in _other_metrics(r)}
            row |= {f"sharpness_{m.replace('-', '_')}": r["sharpness"][m]["value"] for m in _measured(results)}
            keys = (
                "seconds_per_epoch",
                "seconds_per_step",
                "cpu_seconds_per_epoch",
                "wall_seconds",
                "load_average",
                "peak_memory_mib",
            )
            work = ("passes_per_step", "ascent_fraction", "forwards_per_step")
            out.append(row | {k: r.get(k) for k in keys} | {k: r.get(k) for k in work})
    return out


def write_csv(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """``rows(results)`` as CSV."""
    table_rows = rows(results)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table_rows[0]))
        writer.writeheader()
        writer.writerows(table_rows)


def plot(results: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """``accuracy.png`` (per epoch: the score, the evaluation loss and, with label noise, the noisy labels fitted;
    the mean over seeds with a min-max band) and ``cost.png`` (final score against time per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ref_name, ref = _reference(results)
    first = next(iter(results.values()))[0]
    score = first["score"]
    label = score.replace("_", " ")
    loss = next(k for k in first["history"][0] if k.endswith("loss") and not k.startswith("train"))
    panels = [(score, f"{label} (%)", 100), (loss, loss.replace("_", " "), 1)]
    if "flipped_acc_noisy" in first["history"][0]:  # label noise: how much of it each optimizer fits
        panels.append(("flipped_acc_noisy", "noisy labels fitted (%)", 100))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    seeds = max(len(runs) for runs in results.values())
    band = f"mean, min-max over {seeds} seeds" if seeds > 1 else "one seed"
    for ax, (key, ylabel, scale) in zip(axes[0], panels, strict=True):
        for name, runs in results.items():
            epochs = min(len(r["history"]) for r in runs)
            values = [[scale * r["history"][e][key] for r in runs] for e in range(epochs)]
            xs = list(range(1, epochs + 1))
            ax.plot(xs, [statistics.mean(v) for v in values], marker="o", markersize=3, label=name)
            if len(runs) > 1:
                ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ylabel} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{band}; {len(results)} optimizers", fontsize=10)
    fig.tight_layout()
    paths = [out / "accuracy.png", out / "cost.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, runs in results.items():
        acc = [100 * r["final_score"] for r in runs]
        cost = [r["seconds_per_epoch"] / ref for r in runs]
        err = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ax.errorbar(statistics.mean(cost), statistics.mean(acc), yerr=err, fmt="o", capsize=4, label=name)
    ax.set(
        xlabel=f"time per epoch relative to {ref_name}",
        ylabel=f"final {label} (%)",
        title=f"{label} against cost ({'mean ± std over seeds' if seeds > 1 else 'one seed'})",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``)."""
    parent = os.getppid()
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _run_child(cmd: list[str]) -> int:
    """Run ``cmd`` in its own process group and wait for it; see the module docstring for the signals."""
    child = subprocess.Popen(
        cmd, process_group=0, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None
    )

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        return child.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def compare(
    recipe: str | None,
    explicit: dict[str, Any],
    optimizers: list[str],
    seeds: int,
    command: str = "train",
    sharpness: Settings | None = None,
) -> dict[str, Any]:
    """Run ``samopt <command>`` for every optimizer at ``seeds`` seeds in subprocesses, then write the table and
    plots (with ``sharpness``, measure each run once and draw ``landscape.png``); returns the results (per
    optimizer, the runs' summaries)."""
    unknown = [o for o in optimizers if o not in NAMES]
    if unknown or not optimizers:
        raise ValueError(f"unknown optimizer(s) {unknown} in --optimizers; choose from: {', '.join(NAMES)}")
    repeated = sorted({o for o in optimizers if optimizers.count(o) > 1})
    if repeated:
        raise ValueError(f"--optimizers names {repeated} more than once; name each optimizer once")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    explicit = dict(explicit)
    out = Path(explicit.pop("out", None) or ("runs/compare" if command == "train" else "runs/glue-compare"))
    explicit.pop("optimizer", None)
    explicit.pop("resume", None)
    kind = GlueConfig if command == "glue" else TrainConfig
    base = resolve(recipe, explicit, kind)
    configs = {}  # every run's settings, checked before the first run starts
    for seed in range(base.seed, base.seed + seeds):
        for name in optimizers:
            run_dir = out / f"{name}-s{seed}"
            cfg = resolve(recipe, {**explicit, "optimizer": name, "seed": seed, "out": str(run_dir)}, kind)
            validate(cfg)
            configs[name, seed] = cfg
            summary = run_dir / "summary.json"
            if summary.exists():
                diff = config_differences(json.loads(summary.read_text())["config"], cfg)
                if diff:
                    raise ValueError(
                        f"{run_dir} holds a finished run with other settings ({'; '.join(diff)}); "
                        "use another --out for these settings, or delete that run"
                    )
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("samopt compare draws its plots with matplotlib: pip install 'samopt[app]'") from e
    with DirectoryLock(out):  # one comparison writes into out at a time
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in optimizers}
        for seed in range(base.seed, base.seed + seeds):
            for name in optimizers:
                run_dir = out / f"{name}-s{seed}"
                summary = run_dir / "summary.json"
                if not summary.exists():
                    cmd = [sys.executable, "-m", "samopt.train.cli", command]
                    cmd += ["--recipe", recipe] if recipe else []
                    cmd += to_flags({**explicit, "optimizer": name, "seed": seed, "out": str(run_dir)})
                    if (run_dir / "checkpoint.pt").exists():
                        cmd.append("--resume")
                    print(f"\n== {name}, seed {seed} -> {run_dir}", flush=True)
                    code = _run_child(cmd)
                    if code < 0:  # killed by a signal it cannot handle, e.g. SIGKILL from the out-of-memory killer
                        print(
                            f"samopt compare: the run of {name} seed {seed} was killed by "
                            f"{signal.Signals(-code).name}; run the same command again to continue the comparison "
                            "from that run's last checkpoint",
                            file=sys.stderr,
                        )
                        raise SystemExit(128 - code)
                    if code == EXIT_INTERRUPTED:
                        print(
                            f"samopt compare: interrupted in {name} seed {seed}; run the same command again to "
                            "continue the comparison from that run's last checkpoint",
                            file=sys.stderr,
                        )
                    if code != 0:
                        raise SystemExit(code)
                results[name].append(json.loads(summary.read_text()))
        curves = None
        if sharpness is not None:
            settings = dataclasses.replace(sharpness, progress=base.progress)
            for name, runs in results.items():
                for i, r in enumerate(runs):
                    r["sharpness"] = r.get("sharpness", {}) | measure(
                        out / f"{name}-s{base.seed + i}", settings, again=False
                    )
            first = {name: out / f"{name}-s{base.seed}" for name in optimizers}
            curves = landscape_curves(first, LANDSCAPE_ALPHAS, settings)
        text = table(results) + "\n" + reading(results)
        (out / "compare.md").write_text(text)
        write_csv(results, out / "compare.csv")
        (out / "compare.json").write_text(json.dumps(results, indent=1))
        paths = plot(results, out)
        if curves is not None:
            paths.append(plot_curves(curves, out / "landscape.png", "loss around each solution (first seed)"))
        print("\n" + text)
        print(f"table: {out / 'compare.md'} (and compare.csv)\nplots: {', '.join(map(str, paths))}")
        return results
