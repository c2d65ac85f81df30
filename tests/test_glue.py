"""GLUE: the TSV layouts of the real files, label checks, and the official metrics against hand values."""

import math
from pathlib import Path

import pytest
import torch

from samopt.train.glue import TASKS, glue_metrics, matthews, pearson, read_split, spearman

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


@pytest.mark.parametrize(
    "name, folder, split, n, counts",
    [
        ("cola", "CoLA", "train", 8551, [2528, 6023]),
        ("cola", "CoLA", "dev", 1043, [322, 721]),
        ("mrpc", "MRPC", "train", 3668, [1194, 2474]),
        ("mrpc", "MRPC", "dev", 408, [129, 279]),
        ("rte", "RTE", "train", 2490, [1249, 1241]),
        ("rte", "RTE", "dev", 277, [146, 131]),
    ],
)
def test_real_glue_files(name, folder, split, n, counts):
    if not GLUE.exists():
        pytest.fail(f"the GLUE files are expected at {GLUE}")
    data = read_split(name, GLUE / folder, split)
    assert len(data.texts) == n and data.labels.bincount().tolist() == counts  # the counts of shared/data/glue/README
    assert all(len(t) == (1 if name == "cola" else 2) for t in data.texts)
    if (name, split) == ("mrpc", "train"):  # the file starts with a byte-order mark; the header must still be found
        assert data.texts[0][0].startswith("Amrozi accused his brother")


def test_every_task_layout_from_written_files(tmp_path):
    rows = {
        "sst2": ("sentence\tlabel", "a fine film\t1"),
        "stsb": (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
            "0\tg\tf\t2012\t0\ts\ts\tA man.\tA person.\t3.8",
        ),
        "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tWhy?\tHow?\t0"),
        "qnli": ("index\tquestion\tsentence\tlabel", "0\tWho?\tHim.\tnot_entailment"),
        "mnli": (
            "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label",
            "0\t1\t2\tfiction\tA cat sat.\tAn animal sat.\tentailment",
        ),
    }
    for name, (header, row) in rows.items():
        d = tmp_path / name
        d.mkdir()
        for split in ("train", *TASKS[name].dev):
            (d / f"{split}.tsv").write_text(header + "\n" + row + "\n")
        data = read_split(name, d, TASKS[name].dev[-1])
        assert len(data.texts) == 1
    assert read_split("stsb", tmp_path / "stsb", "dev").labels.tolist() == [pytest.approx(3.8)]
    assert read_split("stsb", tmp_path / "stsb", "dev").labels.dtype == torch.float32
    assert read_split("mnli", tmp_path / "mnli", "dev_mismatched").labels.tolist() == [1]
    assert read_split("qnli", tmp_path / "qnli", "train").texts == [("Who?", "Him.")]


def test_glue_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'; choose one of: cola, sst2, mrpc, stsb"):
        read_split("wnli", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"GLUE rte file not found: .*train\.tsv\. --data-dir must hold"):
        read_split("rte", tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of train, dev_matched, dev_mismatched for mnli"):
        read_split("mnli", tmp_path, "dev")
    (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\t1\n")
    with pytest.raises(ValueError, match=r"train\.tsv:3: label '1' is not one of the rte labels"):
        read_split("rte", tmp_path, "train")
    with pytest.raises(ValueError, match=r"has no column\(s\) \['#1 String', '#2 String', 'Quality'\]"):
        read_split("mrpc", tmp_path, "train")


def test_metrics_against_hand_values():
    pred, gold = torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 1])
    # tp 2, tn 2, fp 1, fn 1: MCC = (4 - 1) / sqrt(3 * 3 * 3 * 3) = 1/3; F1 = 4 / (4 + 2) = 2/3
    assert matthews(pred, gold) == pytest.approx(1 / 3)
    assert glue_metrics("mrpc", pred, gold) == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(2 / 3)}
    assert glue_metrics("cola", torch.ones(4, dtype=torch.long), torch.tensor([1, 0, 1, 1])) == {"matthews": 0.0}
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 5.0])
    # Pearson by hand: centred x (-1.5, -.5, .5, 1.5), y (-1.75, .25, -.75, 2.25): 5.5 / sqrt(5 * 8.75)
    assert pearson(x, y) == pytest.approx(5.5 / math.sqrt(5 * 8.75))
    # ties get the average rank: y ranks (1, 2.5, 2.5, 4)
    assert spearman(x, torch.tensor([0.0, 7.0, 7.0, 9.0])) == pytest.approx(
        pearson(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 2.5, 2.5, 4]))
    )
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert set(glue_metrics("stsb", x, y)) == {"pearson", "spearman"}
