"""Sharpness beside accuracy: every seed of every variant of a comparison, measured, tabled and plotted.

Reads ``samopt compare`` folders (one per variant, as ``benchmarks/efficient_sam.py``
writes them: ``OUT/<variant>/<optimizer>-s<seed>``), measures each run's sharpness
with ``samopt sharpness``'s code (written into its summary.json; a run measured
before with the same settings is not measured again), and writes into ``--out``:

- ``sharpness.md``: per variant, the final test accuracy and each measure, mean ± std
  over seeds;
- ``landscape.png``: the training loss along one random filter-normalised direction
  through each variant's first-seed solution (Li et al., NeurIPS 2018), and along
  the line from the first variant's solution to each other's (``alpha`` 0 at the
  first, 1 at the other).

Usage::

    python benchmarks/sharpness_table.py /work/eff-runs --variants sgd,sam,msam-1 --out docs/img/sharpness
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from samopt import diagnostics
from samopt.train.loop import device_named
from samopt.train.sharpness import LANDSCAPE_ALPHAS, Settings, landscape_curves, load_run, measure, training_batches


def _mean_std(values: list[float], scale: float = 1.0) -> str:
    m = statistics.mean(values) * scale
    return f"{m:.3g}" if len(values) < 2 else f"{m:.3g} ± {statistics.stdev(values) * scale:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the folder of the variants' compare folders")
    parser.add_argument("--variants", required=True, help="comma-separated folder names, the reference first")
    parser.add_argument("--measures", default="eigenvalue,trace,m-sharpness")
    parser.add_argument("--examples", type=int, default=Settings.examples)
    parser.add_argument("--m", type=int, default=Settings.m)
    parser.add_argument("--probes", type=int, default=Settings.probes)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    settings = Settings(
        measures=tuple(args.measures.split(",")),
        examples=args.examples,
        m=args.m,
        probes=args.probes,
        progress=args.progress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    runs: dict[str, list[Path]] = {
        v: sorted(p.parent for p in (args.root / v).glob("*-s*/summary.json")) for v in variants
    }
    header = "| variant | seeds | final test acc % | " + " | ".join(settings.measures) + " | seconds per run |"
    lines = [header, "|---" * (4 + len(settings.measures)) + "|"]
    for v, dirs in runs.items():
        if not dirs:
            raise SystemExit(f"no finished run in {args.root / v}")
        results = [measure(d, settings, again=False) for d in dirs]
        accs = [json.loads((d / "summary.json").read_text())["final_score"] for d in dirs]
        cells = [_mean_std([r[name]["value"] for r in results]) for name in settings.measures]
        seconds = statistics.mean(sum(r[n]["seconds"] for n in settings.measures) for r in results)
        lines.append(f"| {v} | {len(dirs)} | {_mean_std(accs, 100)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
        print(lines[-1], flush=True)
    (args.out / "sharpness.md").write_text("\n".join(lines) + "\n")
    curves = landscape_curves({v: dirs[0] for v, dirs in runs.items()}, LANDSCAPE_ALPHAS, settings)
    device = device_named(settings.device)
    reference = variants[0]
    _, ref_task, _ = load_run(runs[reference][0], device)
    start = {k: t.clone() for k, t in ref_task.model.state_dict().items()}
    batches = training_batches(ref_task, settings.examples, settings.m)
    loss_fn = lambda model, batch: ref_task.loss_fn(model(ref_task.prepare(batch[0])), batch[1])  # noqa: E731
    lines_between = {}
    for v in variants[1:]:
        _, task, _ = load_run(runs[v][0], device)
        lines_between[v] = diagnostics.interpolation(
            ref_task.model, loss_fn, batches, start, task.model.state_dict(), LANDSCAPE_ALPHAS[10:]
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colour = {v: f"C{i}" for i, v in enumerate(variants)}  # a variant has one colour in both panels
    for v, curve in curves.items():
        axes[0].plot(curve.alphas, curve.loss, marker="o", markersize=3, label=v, color=colour[v])
    axes[0].set(xlabel="step along a random filter-normalised direction", ylabel="training loss (noisy labels)")
    axes[0].set_title("around each solution (seed 0)")
    for v, line in lines_between.items():
        axes[1].plot(line.alphas, line.loss, marker="o", markersize=3, label=f"{reference} to {v}", color=colour[v])
    axes[1].set(xlabel=f"alpha: (1 - alpha) * {reference} + alpha * other", ylabel="training loss (noisy labels)")
    axes[1].set_title("on the line between two solutions (seed 0)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out / "landscape.png", dpi=120)
    data = {"around": {v: c.loss for v, c in curves.items()}, "between": {v: c.loss for v, c in lines_between.items()}}
    (args.out / "landscape.json").write_text(json.dumps({"alphas": LANDSCAPE_ALPHAS, **data}, indent=1))
    print(f"table: {args.out / 'sharpness.md'}; plot: {args.out / 'landscape.png'}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
