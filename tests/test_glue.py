"""GLUE: the TSV layouts of the real files, label checks, and the official metrics against hand values."""

import hashlib
import io
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import FileServer

from samopt.train import glue
from samopt.train.config import GlueConfig, resolve
from samopt.train.glue import TASKS, glue_metrics, matthews, pearson, read_split, spearman
from samopt.train.loop import run

GLUE = Path(__file__).resolve().parent / "data" / "glue"  # real GLUE dev files, see its README


def as_training_set(tmp_path: Path, folder: str) -> Path:
    """A task folder whose train.tsv and dev.tsv are both the real dev file of ``folder`` (a small real data set)."""
    out = tmp_path / folder
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        shutil.copyfile(GLUE / folder / "dev.tsv", out / f"{split}.tsv")
    return out


@pytest.mark.parametrize(
    "name, folder, n, counts",
    [("cola", "CoLA", 1043, [322, 721]), ("mrpc", "MRPC", 408, [129, 279]), ("rte", "RTE", 277, [146, 131])],
)
def test_real_glue_files(name, folder, n, counts):
    data = read_split(name, GLUE / folder, "dev")
    assert len(data.texts) == n and data.labels.bincount().tolist() == counts  # the counts of the GLUE README
    assert all(len(t) == (1 if name == "cola" else 2) for t in data.texts)
    if name == "mrpc":  # the file starts with a byte-order mark; the header must still be found
        assert data.texts[0][0].startswith("He said the foodservice pie business")


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


def test_reader_errors(tmp_path):
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


# ------------------------------------------------------------------ samopt glue on the packaged MiniLM

TINY = {
    "task": "mrpc",
    "train_subset": 32,
    "max_length": 32,
    "batch_size": 8,
    "epochs": 2,
    "progress": False,
    "lr": 5e-5,
    "num_samples": 4,
}


def glue_cfg(tmp_path, **changes):
    data = {} if "data_dir" in changes else {"data_dir": str(as_training_set(tmp_path, "MRPC"))}
    return resolve(None, {**TINY, **data, "out": str(tmp_path / "run"), **changes}, GlueConfig)


def test_glue_run_reports_the_official_metrics(tmp_path):
    summary = run(glue_cfg(tmp_path, epochs=1))
    record = summary["history"][0]
    assert set(record) == {
        "epoch",
        "train_loss",
        "train_acc",
        "dev_loss",
        "accuracy",
        "f1",
        "lr",
        "train_seconds",
        "train_cpu_seconds",
        "train_load_average",
        "steps",
        "passes_per_step",
        "ascent_fraction",
        "forwards_per_step",
    }
    assert (record["passes_per_step"], record["ascent_fraction"], record["forwards_per_step"]) == (1.0, 0.0, 0.0)
    assert summary["score"] == "accuracy" and 0 <= summary["final_score"] <= 1 and record["steps"] == 4
    assert summary["parameters"] == 22_713_986  # MiniLM-L6 (22.7M) with a 2-class head
    assert summary["config"]["optimizer"] == "adamw" and summary["config"]["schedule"] == "linear"


def test_glue_resume_after_interrupt_is_exact_with_a_fisher_mask(tmp_path, monkeypatch):
    from tests.test_app import _interrupt_at

    whole = run(glue_cfg(tmp_path / "a", optimizer="ssam-f"))
    with monkeypatch.context() as m:
        _interrupt_at(m, 6)
        with pytest.raises(SystemExit):
            run(glue_cfg(tmp_path / "b", optimizer="ssam-f"))
    resumed = run(glue_cfg(tmp_path / "b", optimizer="ssam-f", resume=True))
    for key in ("train_loss", "dev_loss", "accuracy", "f1", "mask_density"):
        assert [r[key] for r in resumed["history"]] == [r[key] for r in whole["history"]], key
    a = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_glue_regression_task(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tg\tf\t2012\t{i}\ts\ts\tA man plays {i}.\tSomeone plays {i}.\t{i % 5}.5\n" for i in range(12)]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text(header + "".join(rows))
    summary = run(
        glue_cfg(
            tmp_path,
            task="stsb",
            data_dir=str(tmp_path),
            train_subset=None,
            epochs=1,
            optimizer="delta-sam",
            estimator="probe",
        )
    )
    assert summary["score"] == "pearson" and "train_acc" not in summary["history"][0]
    assert {"pearson", "spearman", "dev_loss"} <= set(summary["history"][0])


def test_glue_command_errors(tmp_path):
    with pytest.raises(ValueError, match="samopt glue needs --data-dir"):
        run(glue_cfg(tmp_path, data_dir=None))
    with pytest.raises(ValueError, match="label_smoothing applies to classification; stsb is a regression task"):
        run(glue_cfg(tmp_path, task="stsb", label_smoothing=0.1))
    with pytest.raises(FileNotFoundError, match="GLUE rte file not found"):
        run(glue_cfg(tmp_path, task="rte", data_dir=str(tmp_path)))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "samopt.train.cli",
            "glue",
            "--task",
            "mrpc",
            "--data-dir",
            str(as_training_set(tmp_path, "RTE")),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "samopt glue: error: " in r.stderr and "is it the mrpc file?" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "samopt.train.cli", "glue", "--task", "wnli"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "argument --task: invalid choice: 'wnli'" in r.stderr


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
    return out.getvalue()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_download_unpacks_a_glue_archive_into_the_task_folder(tmp_path):
    """A GLUE archive as the benchmark distributes it (task folder, test.tsv, an ``original/`` folder), made of
    real CoLA and RTE rows, served over HTTP: only the task's train and dev files land, byte for byte."""
    cola, rte = _lines(GLUE / "CoLA" / "dev.tsv"), _lines(GLUE / "RTE" / "dev.tsv")
    files = {
        "glue/data/CoLA.zip": _zip(
            {
                "CoLA/train.tsv": b"".join(cola[:800]),
                "CoLA/dev.tsv": b"".join(cola[800:]),
                "CoLA/test.tsv": b"index\tsentence\n0\tA sentence.\n",
                "CoLA/original/raw/dev.tsv": b"not this one\n",
            }
        ),
        "glue/data/RTE.zip": _zip({"RTE/train.tsv": b"".join(rte[:200]), "RTE/dev.tsv": b"".join(rte[:1] + rte[200:])}),
    }
    sums = {name.rsplit("/", 1)[1]: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    server = FileServer(files)
    try:
        assert glue.download("cola", tmp_path / "CoLA", base_url=server.url, sha256=sums) == tmp_path / "CoLA"
        assert glue.download("rte", tmp_path / "RTE", base_url=server.url, sha256=sums) == tmp_path / "RTE"
    finally:
        server.close()
    assert sorted(p.name for p in (tmp_path / "CoLA").iterdir()) == ["dev.tsv", "train.tsv"]  # no archive, no tmp
    assert (tmp_path / "CoLA" / "dev.tsv").read_bytes() == b"".join(cola[800:])
    assert len(read_split("cola", tmp_path / "CoLA", "train").texts) == 800
    assert (
        read_split("rte", tmp_path / "RTE", "dev").labels.tolist()
        == read_split("rte", GLUE / "RTE", "dev").labels[199:].tolist()
    )


def test_download_splits_mrpc_as_the_glue_script_does(tmp_path):
    """The corpus file (here real MRPC rows under its header, with its byte-order mark) and the ids of the dev
    pairs make dev.tsv; the rest make train.tsv, in the corpus's order, both under the corpus's header."""
    header, *rows = (GLUE / "MRPC" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    assert header.startswith("\ufeffQuality")
    dev = rows[::3]
    ids = "".join("\t".join(r.split("\t")[1:3]) + "\n" for r in dev).encode()
    corpus = ("\n".join([header, *(r + " \r" for r in rows)]) + "\n").encode("utf-8")  # stray blanks are stripped
    files = {"senteval/senteval_data/msr_paraphrase_train.txt": corpus, "glue/data/mrpc_dev_ids.tsv": ids}
    sums = {name.rsplit("/", 1)[1]: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    server = FileServer(files)
    try:
        glue.download("mrpc", tmp_path, base_url=server.url, sha256=sums)
        wrong = {**files, "glue/data/mrpc_dev_ids.tsv": ids + b"999\t998\n"}
        server.close()
        server = FileServer(wrong)
        sums["mrpc_dev_ids.tsv"] = hashlib.sha256(wrong["glue/data/mrpc_dev_ids.tsv"]).hexdigest()
        with pytest.raises(ValueError, match=r"holds 136 of the 137 pairs of mrpc_dev_ids.tsv; the two files are not"):
            glue.download("mrpc", tmp_path / "other", base_url=server.url, sha256=sums)
    finally:
        server.close()
    expect = {"dev": dev, "train": [r for i, r in enumerate(rows) if i % 3]}
    for split, kept in expect.items():
        assert (tmp_path / f"{split}.tsv").read_text(encoding="utf-8") == "\n".join([header, *kept]) + "\n"
    assert (
        read_split("mrpc", tmp_path, "dev").labels.tolist()
        == read_split("mrpc", GLUE / "MRPC", "dev").labels[::3].tolist()
    )
    assert list((tmp_path / "other").iterdir()) == []  # a refused split leaves nothing


def test_a_glue_download_with_another_sum_is_refused_and_leaves_nothing(tmp_path):
    body = _zip({"RTE/train.tsv": b"index\tsentence1\tsentence2\tlabel\n"})
    server = FileServer({"glue/data/RTE.zip": body})
    try:
        with pytest.raises(ValueError) as e:  # the published sum by default
            glue.download("rte", tmp_path, base_url=server.url)
        assert f"has SHA-256 {hashlib.sha256(body).hexdigest()}, not the published {glue.SHA256['RTE.zip']}" in str(
            e.value
        )
        with pytest.raises(ValueError, match=r"RTE.zip holds 0 dev.tsv files at its top \(one expected\)"):
            glue.download("rte", tmp_path, base_url=server.url, sha256={"RTE.zip": hashlib.sha256(body).hexdigest()})
        with pytest.raises(OSError, match=r"could not download .*CoLA.zip.*Put cola's train.tsv and dev.tsv"):
            glue.download("cola", tmp_path, base_url=server.url)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_every_task_has_its_files_and_their_published_sums():
    assert set(glue.DOWNLOADS) == set(TASKS)
    names = {path.rsplit("/", 1)[1] for paths in glue.DOWNLOADS.values() for path in paths}
    assert names == set(glue.SHA256)
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in glue.SHA256.values())


def test_glue_download_flag_fetches_missing_files_before_training(tmp_path, monkeypatch):
    rows = _lines(GLUE / "RTE" / "dev.tsv")
    body = _zip({"RTE/train.tsv": b"".join(rows[:33]), "RTE/dev.tsv": b"".join(rows[:1] + rows[33:])})
    server = FileServer({"glue/data/RTE.zip": body})
    monkeypatch.setattr(glue, "GLUE_URL", server.url)
    monkeypatch.setitem(glue.SHA256, "RTE.zip", hashlib.sha256(body).hexdigest())
    try:
        with pytest.raises(FileNotFoundError, match="or pass --download to fetch them"):
            run(glue_cfg(tmp_path, task="rte", data_dir=str(tmp_path / "RTE"), train_subset=None, epochs=1))
        summary = run(
            glue_cfg(tmp_path, task="rte", data_dir=str(tmp_path / "RTE"), train_subset=None, epochs=1, download=True)
        )
    finally:
        server.close()
    assert summary["history"][0]["steps"] == 32 // TINY["batch_size"]
    assert sorted(p.name for p in (tmp_path / "RTE").iterdir()) == ["dev.tsv", "train.tsv"]


def test_glue_dry_run_prints_the_settings_and_the_plan_and_writes_nothing(tmp_path, capsys):
    from samopt.train import cli

    out = tmp_path / "run"
    data = as_training_set(tmp_path, "MRPC")
    assert cli.main(["glue", "--data-dir", str(data), "--out", str(out), "--dry-run", "--optimizer", "sam"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("samopt glue --label-smoothing 0.0 --optimizer sam --base adamw --lr 2e-05 ")
    assert "--task mrpc " in printed[0] and "--no-download " in printed[0]
    steps = 408 // 32  # the last partial batch is dropped
    assert printed[1] == (
        f"plan: GLUE mrpc, all-MiniLM-L6-v2, sam at rho 0.005: 3 epochs x {steps} steps of batch 32 = {3 * steps} "
        f"steps on cpu; results in {out} (--epochs or --train-subset change it)"
    )
    assert len(printed) == 2 and not out.exists()
