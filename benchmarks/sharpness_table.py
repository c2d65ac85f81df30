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
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from samopt.train.cli import settings_from, sharpness_args
from samopt.train.compare import mean_std
from samopt.train.sharpness import LANDSCAPE_ALPHAS, landscape_curves, line_between, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the folder of the variants' compare folders")
    parser.add_argument("--variants", required=True, help="comma-separated folder names, the reference first")
    parser.add_argument("--measures", default="eigenvalue,trace,m-sharpness")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--progress", action="store_true")
    sharpness_args(parser)  # --examples, --m, --probes, ... as samopt sharpness has them
    args = parser.parse_args()
    settings = dataclasses.replace(settings_from(args, args.measures), progress=args.progress)
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
        cells = [mean_std([r[name]["value"] for r in results], spec=".3g", spread=".2g") for name in settings.measures]
        seconds = statistics.mean(sum(r[n]["seconds"] for n in settings.measures) for r in results)
        lines.append(
            f"| {v} | {len(dirs)} | {mean_std(accs, 100, '.3g', '.2g')} | " + " | ".join(cells) + f" | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    (args.out / "sharpness.md").write_text("\n".join(lines) + "\n")
    curves = landscape_curves({v: dirs[0] for v, dirs in runs.items()}, LANDSCAPE_ALPHAS, settings)
    reference = variants[0]
    lines_between = {
        v: line_between(runs[reference][0], runs[v][0], settings, LANDSCAPE_ALPHAS[10:]) for v in variants[1:]
    }
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
