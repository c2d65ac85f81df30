"""``samopt sharpness`` and ``samopt compare --sharpness``: real runs measured, the values written where promised."""

import json

import pytest
import torch

from samopt import diagnostics
from samopt.train import cli, config
from samopt.train.loop import run
from samopt.train.sharpness import Settings, load_run, training_batches
from tests.test_app import TINY, samopt_cli, tiny

FAST = ["--examples", "128", "--m", "64", "--probes", "3", "--max-iter", "4", "--steps", "2", "--samples", "2"]


def test_sharpness_measures_a_finished_run_into_its_summary(tmp_path, capsys):
    run(tiny(tmp_path, optimizer="sam", epochs=1))
    run_dir = tmp_path / "run"
    before = json.loads((run_dir / "summary.json").read_text())
    weights = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    measures = "eigenvalue,trace,m-sharpness,average-sharpness"
    assert cli.main(["sharpness", str(run_dir), "--measures", measures, *FAST, "--no-progress"]) == 0
    assert f"{run_dir}: eigenvalue " in capsys.readouterr().out
    after = json.loads((run_dir / "summary.json").read_text())
    sharp = after.pop("sharpness")
    assert after == before and list(sharp) == measures.split(",")
    # the values are those of samopt.diagnostics on the run's final weights and its first 128 training examples
    _, task, _ = load_run(run_dir, torch.device("cpu"))
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, weights[k])
    batches = training_batches(task, 128, 64)
    first = next(task.train.epoch(0))
    assert len(batches) == 2 and torch.equal(batches[0][0], first[0]) and torch.equal(batches[0][1], first[1])

    def loss_fn(model, batch):
        return task.loss_fn(model(batch[0]), batch[1])

    eig = diagnostics.top_eigenvalues(task.model, loss_fn, batches, max_iter=4)
    trace = diagnostics.hessian_trace(task.model, loss_fn, batches, probes=3)
    m = diagnostics.m_sharpness(task.model, loss_fn, batches, rho=0.05, steps=2)
    avg = diagnostics.average_sharpness(task.model, loss_fn, batches, sigma=0.01, samples=2)
    assert sharp["eigenvalue"]["values"] == eig.values and sharp["eigenvalue"]["value"] == eig.values[0]
    assert (sharp["trace"]["value"], sharp["trace"]["stderr"]) == (trace.value, trace.stderr)
    assert sharp["trace"]["settings"]["estimator"] == "hutchinson" and sharp["trace"]["settings"]["probes"] == 3
    assert sharp["m-sharpness"]["per_batch"] == m.per_batch and sharp["average-sharpness"]["value"] == avg.value
    assert sharp["m-sharpness"]["settings"] == {
        "examples": 128,
        "m": 64,
        "bn": "train",
        "seed": 0,
        "autocast": "none",
        "rho": 0.05,
        "norm": "l2",
        "adaptive": True,
        "steps": 2,
    }
    assert all(r["seconds"] > 0 for r in sharp.values())


def test_bad_sharpness_requests_are_refused_naming_the_argument(tmp_path):
    run(tiny(tmp_path, epochs=1))
    run_dir = str(tmp_path / "run")
    cases = [
        ([str(tmp_path)], "holds no checkpoint.pt: point samopt sharpness at the --out folder"),
        ([run_dir, "--measures", "eigenvalue,flatness"], "unknown measure(s) ['flatness'] in --measures"),
        ([run_dir, "--m", "512", "--examples", "256"], "--m (512) must be at most --examples (256)"),
        ([run_dir, "--examples", "4096"], "--examples (4096) must be at most the run's training examples (256)"),
        ([run_dir, "--rho", "0"], "--rho must be a finite number > 0, got 0.0"),
        ([run_dir, "--steps", "0"], "--steps must be an integer >= 1, got 0"),
        ([run_dir, "--measures", "none"], "--measures none with neither --landscape nor --interpolate"),
        (
            [run_dir, "--measures", "trace", "--trace-estimator", "hutch++", "--probes", "4"],
            "--probes must be a multiple of 3 and at least 6 with --trace-estimator hutch++, got 4",
        ),
    ]
    for args, message in cases:
        r = samopt_cli("sharpness", *args, "--no-progress")
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = samopt_cli("sharpness", run_dir, "--bn", "running")
    assert r.returncode == 2 and "argument --bn: invalid choice: 'running'" in r.stderr
    (tmp_path / "run" / "summary.json").unlink()
    r = samopt_cli("sharpness", run_dir)
    assert r.returncode == 2 and "finish it first (the same command with --resume)" in r.stderr


def test_compare_gains_sharpness_columns_and_a_landscape_and_measures_each_run_once(tmp_path):
    out = tmp_path / "cmp"
    flags = config.to_flags({**TINY, "epochs": 1, "out": str(out)})
    sharp = ["--sharpness", "eigenvalue,m-sharpness", "--sharpness-examples", "128", "--sharpness-m", "64"]
    sharp += ["--sharpness-max-iter", "3", "--sharpness-steps", "2"]
    r = samopt_cli("compare", "--optimizers", "sgd,sam", "--seeds", "2", *flags, *sharp)
    assert r.returncode == 0, r.stderr
    table = (out / "compare.md").read_text().splitlines()
    assert "| best epoch | top eigenvalue | m-sharpness | wall time s |" in table[0]
    results = json.loads((out / "compare.json").read_text())
    for name in ("sgd", "sam"):
        values = [s["sharpness"]["eigenvalue"]["value"] for s in results[name]]
        stored = [json.loads((out / f"{name}-s{i}" / "summary.json").read_text())["sharpness"] for i in (0, 1)]
        assert values == [s["eigenvalue"]["value"] for s in stored] and values[0] != values[1]
        row = next(line for line in table if line.startswith(f"| {name} |"))
        mean, std = sum(values) / 2, abs(values[0] - values[1]) / 2**0.5
        assert f"| {mean:.3g} ± {std:.2g} |" in row
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / "landscape.png") in r.stdout
    seconds = results["sam"][1]["sharpness"]["m-sharpness"]["seconds"]
    again = samopt_cli("compare", "--optimizers", "sgd,sam", "--seeds", "2", *flags, *sharp)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "compare.json").read_text())["sam"][1]["sharpness"]["m-sharpness"]["seconds"] == seconds


def test_the_sharpness_settings_refuse_bad_values_by_flag_name():
    with pytest.raises(ValueError, match=r"--sigma must be a finite number > 0, got nan"):
        Settings(sigma=float("nan"))
    with pytest.raises(ValueError, match="--norm must be one of l2, linf"):
        Settings(norm="l1")
    with pytest.raises(ValueError, match="--autocast must be one of none, bf16, got 'fp8'"):
        Settings(autocast="fp8")
    with pytest.raises(ValueError, match=r"unknown measure\(s\) \[\] in --measures"):
        Settings(measures=())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sharpness", "eigenvalue", "--sharpness-rho", "-1"], "--sharpness-rho must be a finite number > 0"),
        (["--sharpness", "flatness"], "unknown measure(s) ['flatness'] in --sharpness; choose from"),
        (
            ["--sharpness", "m-sharpness", "--sharpness-m", "64", "--sharpness-examples", "32"],
            "--sharpness-m (64) must be at most --sharpness-examples (32)",
        ),
        (
            ["--sharpness-rho", "0.1", "--sharpness-m", "64"],
            "--sharpness-rho, --sharpness-m set how sharpness is measured, but nothing is measured without "
            "--sharpness MEASURES",
        ),
    ],
)
def test_compare_names_a_bad_sharpness_setting_by_its_own_flag(tmp_path, capsys, flags, message):
    out = tmp_path / "c"  # compare's --rho is the optimizer's: the message must not send the user there
    assert cli.main(["compare", "--optimizers", "sgd", "--dataset", "synthetic", *flags, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_sharpness_draws_landscapes_and_the_line_to_another_run(tmp_path):
    run(tiny(tmp_path / "a", optimizer="sgd", epochs=1))
    run(tiny(tmp_path / "b", optimizer="sam", epochs=1))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    args = ["sharpness", str(a), "--measures", "none", "--examples", "64", "--m", "64", "--no-progress"]
    assert cli.main([*args, "--landscape", "2d", "--landscape-points", "3", "--interpolate", str(b)]) == 0
    assert cli.main([*args, "--landscape", "1d", "--landscape-points", "5", "--landscape-span", "0.5"]) == 0
    _, task, _ = load_run(a, torch.device("cpu"))
    _, other, _ = load_run(b, torch.device("cpu"))
    batch = training_batches(task, 64, 64)[0]
    losses = []
    for model in (task.model, other.model):
        model.train()
        with torch.no_grad():
            losses.append(float(task.loss_fn(model(batch[0]), batch[1])))
    plane = json.loads((a / "landscape-2d.json").read_text())
    assert plane["alphas"] == plane["betas"] == [-1.0, 0.0, 1.0] and plane["loss"][1][1] == pytest.approx(losses[0])
    assert plane["settings"] == {"examples": 64, "m": 64, "bn": "train", "seed": 0, "autocast": "none"}
    curve = json.loads((a / "landscape-1d.json").read_text())
    assert curve["alphas"] == [-0.5, -0.25, 0.0, 0.25, 0.5] and curve["loss"][2] == pytest.approx(losses[0])
    line = json.loads((a / "line-to-run.json").read_text())
    assert line["loss"][line["alphas"].index(0.0)] == pytest.approx(losses[0])
    assert line["loss"][line["alphas"].index(1.0)] == pytest.approx(losses[1])
    for png in ("landscape-2d.png", "landscape-1d.png", "line-to-run.png"):
        assert (a / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = samopt_cli(*args, "--landscape", "1d", "--landscape-points", "1")
    assert r.returncode == 2 and "--landscape-points must be an integer >= 2, got 1" in r.stderr
    assert "sharpness" not in json.loads((a / "summary.json").read_text())  # --measures none: nothing measured


def test_sharpness_of_a_glue_run_pads_its_batches_and_measures_in_eval_mode(tmp_path):
    from tests.test_glue import glue_cfg

    run(glue_cfg(tmp_path, epochs=1, max_length=128))
    run_dir = tmp_path / "run"
    _, task, _ = load_run(run_dir, torch.device("cpu"))
    batches = training_batches(task, 16, 16)  # two batches of 8 pairs, each padded to its own longest
    parts = [x for x, _ in [next(task.train.epoch(0)), list(task.train.epoch(0))[1]]]
    assert parts[0].shape[-1] != parts[1].shape[-1] and batches[0][0].shape[-1] == max(p.shape[-1] for p in parts)
    task.model.eval()
    with torch.no_grad():  # padding with the pad id and attention mask 0 changes no logit
        padded = task.model(batches[0][0][8:])
        assert torch.allclose(padded, task.model(parts[1]), atol=1e-5)
    args = ["sharpness", str(run_dir), "--measures", "eigenvalue,m-sharpness", "--examples", "16", "--m", "8"]
    assert cli.main([*args, "--max-iter", "2", "--steps", "1", "--no-progress"]) == 0
    sharp = json.loads((run_dir / "summary.json").read_text())["sharpness"]
    assert sharp["eigenvalue"]["settings"]["bn"] == "eval" and sharp["eigenvalue"]["hvps"] == 2
    assert sharp["m-sharpness"]["value"] >= 0 and sharp["m-sharpness"]["passes"] == 2 * 3


def test_glue_compare_gains_the_sharpness_columns_measured_in_eval_mode(tmp_path):
    from tests.test_glue import TINY as GLUE_TINY
    from tests.test_glue import as_training_set

    out = tmp_path / "cmp"
    data = str(as_training_set(tmp_path, "MRPC"))
    flags = config.to_flags({**GLUE_TINY, "epochs": 1, "data_dir": data, "out": str(out)})
    sharp = ["--sharpness", "m-sharpness", "--sharpness-examples", "16", "--sharpness-m", "8", "--sharpness-steps", "1"]
    r = samopt_cli("glue-compare", "--optimizers", "adamw,sam", *flags, *sharp)
    assert r.returncode == 0, r.stderr
    table = (out / "compare.md").read_text().splitlines()
    assert "| m-sharpness |" in table[0] and (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("adamw", "sam"):
        stored = json.loads((out / f"{name}-s0" / "summary.json").read_text())["sharpness"]["m-sharpness"]
        assert stored["settings"]["bn"] == "eval" and stored["passes"] == 2 * 3 and stored["value"] >= 0
