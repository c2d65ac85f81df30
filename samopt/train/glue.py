"""GLUE (Wang et al., ICLR 2019, arXiv:1804.07461) in its original tab-separated layout, and its official metrics.

:func:`read_split` reads ``<data_dir>/train.tsv`` or a dev file of one task into
sentences and labels, checking every label against the task's label set;
:data:`TASKS` describes the eight tasks (columns, labels, dev files, metrics).
The metrics are the benchmark's: Matthews correlation for CoLA, accuracy and F1
(positive class 1) for MRPC and QQP, Pearson and Spearman correlation for STS-B,
accuracy for the others (MNLI on its matched and mismatched dev sets).

Example::

    split = read_split("mrpc", "../shared/data/glue/MRPC", "dev")
    split.texts[0], split.labels[:3]       # (sentence1, sentence2), tensor([1, 0, 0])
    glue_metrics("mrpc", predictions, split.labels)   # {"accuracy": ..., "f1": ...}
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TASKS", "GlueSplit", "GlueTask", "glue_metrics", "matthews", "pearson", "read_split", "spearman"]


@dataclass(frozen=True)
class GlueTask:
    """Where a task's text and label live in its TSV files, its labels (empty: regression) and metrics."""

    text: tuple[str | int, ...]  # column names, or indices for header-less files
    label: str | int
    labels: tuple[str, ...]
    dev: tuple[str, ...]
    metrics: tuple[str, ...]
    header: bool = True

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


#: The eight GLUE tasks (WNLI left out, as in most papers).
TASKS: dict[str, GlueTask] = {
    "cola": GlueTask((3,), 1, ("0", "1"), ("dev",), ("matthews",), header=False),
    "sst2": GlueTask(("sentence",), "label", ("0", "1"), ("dev",), ("accuracy",)),
    "mrpc": GlueTask(("#1 String", "#2 String"), "Quality", ("0", "1"), ("dev",), ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), "score", (), ("dev",), ("pearson", "spearman")),
    "qqp": GlueTask(("question1", "question2"), "is_duplicate", ("0", "1"), ("dev",), ("accuracy", "f1")),
    "mnli": GlueTask(
        ("sentence1", "sentence2"),
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        ("dev_matched", "dev_mismatched"),
        ("accuracy",),
    ),
    "qnli": GlueTask(("question", "sentence"), "label", ("entailment", "not_entailment"), ("dev",), ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("dev",), ("accuracy",)),
}


@dataclass
class GlueSplit:
    """One split of a task: a tuple of one or two sentences per example, and labels (int64, or float32 for STS-B)."""

    texts: list[tuple[str, ...]]
    labels: Tensor


def task(name: str) -> GlueTask:
    if name not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def read_split(name: str, data_dir: str | os.PathLike, split: str) -> GlueSplit:
    """The ``split`` (``"train"``, ``"dev"``, ``"dev_matched"``, ...) of task ``name`` from ``data_dir/<split>.tsv``."""
    spec = task(name)
    if split not in ("train", *spec.dev):
        raise ValueError(f"split must be one of {', '.join(('train', *spec.dev))} for {name}; got {split!r}")
    path = Path(data_dir).expanduser() / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(
            f"GLUE {name} file not found: {path}. --data-dir must hold the task's train.tsv and "
            f"{', '.join(d + '.tsv' for d in spec.dev)} in the original GLUE layout"
        )
    with open(path, newline="", encoding="utf-8-sig") as f:  # MRPC starts with a BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        if not rows:
            raise ValueError(f"{path} is empty")
        header, rows = rows[0], rows[1:]
        missing = [c for c in (*spec.text, spec.label) if c not in header]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing} (header: {header}); is it the {name} file?")
        cols = [header.index(c) for c in spec.text]  # type: ignore[arg-type]
        label_col = header.index(spec.label)  # type: ignore[arg-type]
    else:
        cols, label_col = list(spec.text), int(spec.label)  # type: ignore[arg-type]
    texts, labels = [], []
    for line, row in enumerate(rows, start=2 if spec.header else 1):
        if len(row) <= max(*cols, label_col):
            raise ValueError(f"{path}:{line}: {len(row)} columns, expected at least {max(*cols, label_col) + 1}")
        texts.append(tuple(row[c] for c in cols))
        value = row[label_col]
        if spec.labels:
            if value not in spec.labels:
                raise ValueError(
                    f"{path}:{line}: label {value!r} is not one of the {name} labels {list(spec.labels)}; "
                    "is this the right task's file?"
                )
            labels.append(spec.labels.index(value))
        else:
            try:
                labels.append(float(value))
            except ValueError:
                raise ValueError(f"{path}:{line}: {name} needs a real-valued score, got {value!r}") from None
    dtype = torch.int64 if spec.labels else torch.float32
    return GlueSplit(texts, torch.tensor(labels, dtype=dtype))


def matthews(pred: Tensor, gold: Tensor) -> float:
    """Matthews correlation coefficient of binary predictions (0 when a row or column of the confusion is empty)."""
    p, g = pred.bool(), gold.bool()
    tp, tn = float((p & g).sum()), float((~p & ~g).sum())
    fp, fn = float((p & ~g).sum()), float((~p & g).sum())
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def f1(pred: Tensor, gold: Tensor) -> float:
    """F1 of the positive class 1."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp, fn = float(((pred == 1) & (gold == 0)).sum()), float(((pred == 0) & (gold == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation (float64)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den else 0.0


def _ranks(x: Tensor) -> Tensor:
    """Ranks 1..n with ties given their average rank."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(x), _ranks(y))


def glue_metrics(name: str, predictions: Tensor, gold: Tensor) -> dict[str, float]:
    """The official metrics of task ``name``: class predictions (or STS-B scores) against gold labels."""
    spec = task(name)
    fns = {
        "accuracy": lambda: float((predictions == gold).double().mean()),
        "f1": lambda: f1(predictions, gold),
        "matthews": lambda: matthews(predictions, gold),
        "pearson": lambda: pearson(predictions, gold),
        "spearman": lambda: spearman(predictions, gold),
    }
    return {m: fns[m]() for m in spec.metrics}
