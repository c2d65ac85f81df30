"""The GLUE rho grid and the full-size table of ``benchmarks/glue_grid.sh``, as Markdown, from the runs' summaries.

Reads every ``OUT/<cell>/<optimizer>-s<seed>/summary.json`` (finished runs only, so a grid still running gives
the cells it has, each with its number of seeds) and prints, per task:

- the grid: final dev score (mean ± std over seeds, then the seeds in brackets) per optimizer and rho, with
  AdamW's beside it and the majority-class score of the dev set, then each cell's difference from AdamW paired
  by seed;
- the full-size table: every run on the whole training set at the GLUE default rho (or none: AdamW), so under
  PROTOCOL=cpu the ``OUT/<task>-full*`` cells, under PROTOCOL=full the grid's AdamW cell and its cells at the
  default rho with the δ-SAM logit cell; final and best score, per-seed finals, the final score's difference
  from AdamW's paired by seed, time per epoch relative to AdamW.

Usage::

    python benchmarks/glue_grid_table.py OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from samopt.train.compare import mean_std
from samopt.train.optimizers import GLUE_RHO

#: Majority-class accuracy of the dev sets (MRPC 279 of 408 pairs are paraphrases, RTE 146 of 277 are
#: entailment).
MAJORITY = {"mrpc": 100 * 279 / 408, "rte": 100 * 146 / 277}


def runs(root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Finished runs by cell folder, then by optimizer, in seed order."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.glob("*/*/summary.json"), key=lambda p: (p.parent.parent.name, p.parent.name)):
        summary = json.loads(path.read_text())
        found[path.parent.parent.name][summary["optimizer"]].append(summary)
    return found


def label(summary: dict[str, Any]) -> str:
    """The optimizer as the tables name it: δ-SAM with its estimator."""
    name, cfg = summary["optimizer"], summary["config"]
    return f"delta-sam ({cfg['estimator']})" if name == "delta-sam" else name


def cell(group: list[dict[str, Any]]) -> str:
    finals = [100 * r["final_score"] for r in group]
    return f"{mean_std(finals, 1)} ({', '.join(f'{f:.2f}' for f in finals)})"


def paired(group: list[dict[str, Any]], ref: list[dict[str, Any]]) -> str:
    """Final score minus ``ref``'s over the seeds both have (same seed: same classifier head and batch order),
    mean ± std of the per-seed differences in points, then the differences."""
    base = {r["config"]["seed"]: r["final_score"] for r in ref}
    diffs = [100 * (r["final_score"] - base[r["config"]["seed"]]) for r in group if r["config"]["seed"] in base]
    return f"{mean_std(diffs, 1, '+.2f', '.2f')} ({', '.join(f'{d:+.2f}' for d in diffs)})" if diffs else ""


def grid(task: str, cells: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    by: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(dict)
    adamw = None
    for name, optimizers in cells.items():
        if not name.startswith(f"{task}-") or name.startswith(f"{task}-full"):
            continue
        for group in optimizers.values():
            rho = group[0]["config"]["rho"]
            if rho is None:
                adamw = group
            else:
                by[label(group[0])][rho] = group
    rhos = sorted({rho for row in by.values() for rho in row})
    if not rhos and adamw is None:
        return []
    first = (adamw or next(iter(next(iter(by.values())).values())))[0]
    lines = [
        f"### {task.upper()}: final dev {first['score']} % by rho (majority class {MAJORITY[task]:.2f})",
        "",
        f"AdamW: {cell(adamw) if adamw else 'not run'}",
        "",
    ]
    header = ["| optimizer | " + " | ".join(f"rho {rho:g}" for rho in rhos) + " |", "|---" * (1 + len(rhos)) + "|"]
    if rhos:
        lines += header
    for name, row in sorted(by.items()):
        lines.append(f"| {name} | " + " | ".join(cell(row[rho]) if rho in row else "" for rho in rhos) + " |")
    if rhos and adamw:
        lines += ["", "Final minus AdamW's, paired by seed, points:", "", *header]
        for name, row in sorted(by.items()):
            lines.append(
                f"| {name} | " + " | ".join(paired(row[rho], adamw) if rho in row else "" for rho in rhos) + " |"
            )
    return [*lines, ""]


def full(task: str, cells: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    groups = [
        g
        for name, opts in cells.items()
        if name.startswith(f"{task}-")
        for g in opts.values()
        if g[0]["config"]["train_subset"] is None and g[0]["config"]["rho"] in (None, GLUE_RHO)
    ]
    if not groups:
        return []
    ref = next((g for g in groups if g[0]["optimizer"] == "adamw"), groups[0])
    ref_time = statistics.mean(r["cpu_seconds_per_epoch"] for r in ref)
    score = groups[0][0]["score"]
    lines = [
        f"### {task.upper()} at full size, the defaults (majority class {MAJORITY[task]:.2f})",
        "",
        f"| optimizer | seeds | final {score} % (per seed) | best {score} % | final - {label(ref[0])}, paired by seed "
        f"(per seed) | CPU s/epoch | x {label(ref[0])} |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in sorted(groups, key=lambda g: (g is not ref, label(g[0]))):
        spe = statistics.mean(r["cpu_seconds_per_epoch"] for r in g)  # steadier than wall time beside other runs
        lines.append(
            f"| {label(g[0])} | {len(g)} | {cell(g)} | {mean_std([r['best_score'] for r in g], 100)} | "
            f"{paired(g, ref) if g is not ref else ''} | {spe:.0f} | {spe / ref_time:.2f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="OUT of benchmarks/glue_grid.sh")
    args = parser.parse_args()
    cells = runs(args.root)
    for task in MAJORITY:
        print("\n".join(grid(task, cells) + full(task, cells)))


if __name__ == "__main__":
    main()
