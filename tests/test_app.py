"""The ``samopt`` application: recipes, schedule, training step, resume after Ctrl-C, CLI errors, compare."""

import argparse
import csv
import dataclasses
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from samopt.train import cli, config, loop, vision
from samopt.train.config import RECIPES, GlueConfig, TrainConfig, resolve
from samopt.train.loop import CheckpointError, lr_factor, run
from samopt.train.models import MODELS
from samopt.train.optimizers import Amp, base_optimizer, build_optimizer, train_step
from tests.helpers import bn_net, image_batch

# 4 steps per epoch on the synthetic CIFAR-shaped data, no progress bars
TINY = {
    "dataset": "synthetic",
    "synthetic_size": 320,
    "model": "resnet-small",
    "train_subset": 256,
    "batch_size": 64,
    "epochs": 2,
    "progress": False,
    "lr": 0.05,
    "sparsity": 0.5,
    "num_samples": 8,
}


def tiny(tmp_path, **changes) -> TrainConfig:
    return resolve(None, {**TINY, "out": str(tmp_path / "run"), **changes})


# ------------------------------------------------------------------ settings


def test_recipe_resolution_layers_defaults_recipe_and_flags():
    cfg = resolve("cifar10-resnet18", {"epochs": 10, "seed": 3})
    assert (cfg.dataset, cfg.model, cfg.optimizer) == ("cifar10", "resnet18", "ssam-f")
    sparse = (cfg.rho, cfg.weight_decay, cfg.sparsity, cfg.num_samples, cfg.mask_interval, cfg.cutout)
    assert sparse == (0.1, 1e-3, 0.5, 16, 1, 16)  # the Sparse SAM README's SSAM-F ResNet-18 command
    assert (cfg.epochs, cfg.seed, cfg.lr, cfg.batch_size) == (10, 3, 0.05, 128)  # flags, then recipe, then defaults
    assert resolve(None, {"dataset": "synthetic"}) == TrainConfig(dataset="synthetic")  # no recipe: the defaults
    assert resolve(None, {}) == TrainConfig(**config.DATASET_DEFAULTS["fashion-mnist"])  # but CPU-sized there
    # per-optimizer settings: SGD's weight decay, SAM's rho, and flags still win
    sgd = resolve("cifar10-resnet18", {"optimizer": "sgd"})
    assert (sgd.weight_decay, sgd.rho) == (5e-4, None)
    assert resolve("cifar10-resnet18", {"optimizer": "sam", "rho": 0.3}).rho == 0.3
    assert resolve("cifar10-resnet18", {"optimizer": "asam"}).rho is None  # ASAM's own default (0.5)
    assert resolve("fmnist-noisy", {"optimizer": "msam"}).rho == 1.0  # measured there; not SAM's scale
    assert resolve("cifar10-resnet18", {"optimizer": "msam"}).rho is None  # MSAM's own default (3)
    assert resolve("cifar10-resnet18", {"optimizer": "msam"}).weight_decay == 1e-3
    wrn = resolve("cifar100-wrn28-10", {"optimizer": "sam"})
    assert (wrn.model, wrn.rho, wrn.weight_decay, wrn.dataset) == ("wrn28-10", 0.2, 1e-3, "cifar100")
    imagenet = resolve("imagenet-resnet50", {})
    settings = (imagenet.optimizer, imagenet.epochs, imagenet.batch_size, imagenet.rho, imagenet.weight_decay)
    assert (*settings, imagenet.num_samples) == ("ssam-f", 90, 256, 0.7, 1e-4, 128)
    # the published variants' official runs: the variant's own settings, its rho for the optimizers compared on it
    gsam = resolve("cifar10-wrn16-8-gsam", {})
    settings = (gsam.optimizer, gsam.model, gsam.rho, gsam.gsam_alpha, gsam.adaptive, gsam.label_smoothing, gsam.lr)
    assert settings == ("gsam", "wrn16-8", 2.0, 0.4, True, 0.1, 0.1)
    assert resolve("cifar10-wrn16-8-gsam", {"optimizer": "asam"}).rho == 2.0  # its baseline, on ASAM's scale
    sam = resolve("cifar10-wrn16-8-gsam", {"optimizer": "sam"})
    assert (sam.rho, sam.adaptive, sam.label_smoothing) == (None, False, 0.1)  # not SAM's scale: its own default
    fsam = resolve("cifar100-resnet18-fsam", {})
    assert (fsam.rho, fsam.fsam_sigma, fsam.fsam_lambda, fsam.lr, fsam.weight_decay) == (0.2, 1.0, 0.95, 0.05, 1e-3)
    assert resolve("cifar100-resnet18-fsam", {"optimizer": "sam"}).rho == 0.2
    vasso = resolve("cifar100-wrn28-10-vasso", {})
    assert (vasso.model, vasso.rho, vasso.vasso_theta, vasso.lr, vasso.cutout) == ("wrn28-10", 0.2, 0.9, 0.1, 16)
    wsam = resolve("cifar10-resnet18-wsam", {})
    assert (wsam.rho, wsam.wsam_gamma, wsam.wsam_coupled, wsam.cutout, wsam.weight_decay) == (0.2, 0.9, False, 0, 5e-4)
    recipes = "fmnist-demo, fmnist-noisy, cifar10-resnet18, "
    with pytest.raises(ValueError, match=f"unknown recipe 'cifar'; choose one of: {recipes}"):
        resolve("cifar", {})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['rhoo'\]"):
        resolve(None, {"rhoo": 1})


def test_every_recipe_names_valid_settings():
    for name, recipe in RECIPES.items():
        for optimizer in (None, *recipe.per_optimizer):
            loop.validate(resolve(name, {} if optimizer is None else {"optimizer": optimizer}))
        assert recipe.description and recipe.source


def test_lr_schedules_against_hand_values():
    cfg = TrainConfig(epochs=4, warmup_epochs=1, schedule="cosine")
    f = lr_factor(cfg, steps_per_epoch=10)  # 10 warmup steps, then cosine over 30
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and f(25) == pytest.approx(0.5)
    assert f(39) == pytest.approx(0.5 * (1 + math.cos(29 / 30 * math.pi)))
    multi = lr_factor(TrainConfig(epochs=10, schedule="multistep", milestones=[2, 5], gamma=0.1), 10)
    assert [multi(s) for s in (0, 19, 20, 49, 50, 99)] == [
        1,
        1,
        pytest.approx(0.1),
        pytest.approx(0.1),
        pytest.approx(0.01),
        pytest.approx(0.01),
    ]
    assert lr_factor(TrainConfig(schedule="constant"), 5)(123) == 1.0


def test_glue_runs_default_to_a_smaller_rho_and_an_explicit_rho_wins():
    def rho(cfg, kind):
        return build_optimizer(cfg, bn_net(), steps_per_epoch=1, kind=kind).param_groups[0]["rho"]

    for name in ("sam", "ssam-d", "random-mask", "delta-sam", "looksam"):
        assert rho(GlueConfig(optimizer=name), "glue") == 0.005, name  # 0.05 stays at the majority class on MiniLM
        assert rho(TrainConfig(optimizer=name), "image") == 0.05, name
    assert (rho(GlueConfig(optimizer="asam"), "glue"), rho(TrainConfig(optimizer="asam"), "image")) == (0.05, 0.5)
    assert rho(GlueConfig(optimizer="sam", rho=0.05), "glue") == 0.05


def test_a_glue_run_of_msam_needs_an_explicit_rho():
    # MSAM's default, 3 (the official image commands), is not measured on GLUE, where SAM's 0.05 already stays at
    # the majority class: no default is given there
    with pytest.raises(ValueError) as e:
        loop.validate(GlueConfig(optimizer="msam"))
    assert str(e.value) == (
        "rho must be given (--rho) for optimizer 'msam' on glue tasks: its default, 3, is for images and no glue "
        "value is measured"
    )
    with pytest.raises(ValueError, match=re.escape(str(e.value))):  # the library's builder says the same
        build_optimizer(GlueConfig(optimizer="msam"), bn_net(), 1, kind="glue")
    loop.validate(GlueConfig(optimizer="msam", rho=0.01, data_dir="glue/MRPC"))
    assert build_optimizer(GlueConfig(optimizer="msam", rho=0.01), bn_net(), 1, kind="glue").rho == 0.01
    listed = samopt_cli("optimizers").stdout
    assert "default rho 3.0 (on GLUE: give --rho)" in listed and "default rho 0.05 (on GLUE 0.005)" in listed
    assert build_optimizer(TrainConfig(optimizer="msam"), bn_net(), 1, kind="image").rho == 3.0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_delta_sams_probe_estimator_is_refused_under_autocast(amp):
    # measured (benchmarks/delta_probe_precision.py): under bf16 the probes' estimates are further from the exact
    # per-example norms than equal weights, on Fashion-MNIST (0.88 against 0.41) and on MiniLM (0.36 against 0.04)
    for cfg in (TrainConfig, GlueConfig):
        with pytest.raises(ValueError) as e:
            loop.validate(cfg(optimizer="delta-sam", amp=amp))
        assert str(e.value) == (
            f"estimator='probe' (delta-sam's default) cannot run under amp='{amp}': its probes move the weights by "
            "rho / sqrt(#parameters), below the rounding of a half-precision forward, and its weights then stray "
            "further from the true per-example norms than SAM's equal weights (docs/benchmarks.md); use "
            "estimator='logit' (or 'exact') or amp='none'"
        )
    loop.validate(TrainConfig(optimizer="delta-sam", estimator="logit", amp="bf16"))
    loop.validate(TrainConfig(optimizer="delta-sam", alpha=0.0, amp="bf16"))  # SAM: no estimate is made
    loop.validate(TrainConfig(optimizer="delta-sam", amp="none"))


def test_base_optimizer_by_name():
    assert base_optimizer("AdamW") is torch.optim.AdamW and base_optimizer("rmsprop") is torch.optim.RMSprop
    with pytest.raises(ValueError, match=r"unknown base optimizer 'lion'; choose a torch.optim class: .*adamw"):
        base_optimizer("lion")
    with pytest.raises(ValueError, match="base optimizer LBFGS takes no weight_decay argument; choose another --base"):
        build_optimizer(TrainConfig(optimizer="sam", base="lbfgs"), bn_net(), steps_per_epoch=1)


def test_bf16_autocast_run_on_cpu_and_fp16_needs_cuda(tmp_path, monkeypatch):
    seen = []
    real = torch.nn.Conv2d.forward

    def spy(self, x):  # every convolution of the training runs under bf16 autocast
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), real(self, x).dtype))
        return real(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    summary = run(tiny(tmp_path, optimizer="sam", amp="bf16", epochs=1))
    monkeypatch.undo()
    assert summary["history"][0]["train_loss"] > 0
    training = [s for s in seen if s[0]]
    assert len(training) >= 4 * 2 * 7  # 4 steps, 2 passes each, the small ResNet's 7 convolutions
    assert all(s == (True, torch.bfloat16, torch.bfloat16) for s in training)
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device; on the CPU use amp='bf16' or 'none'"):
        run(tiny(tmp_path / "fp16", optimizer="sam", amp="fp16", device="cpu"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"optimizer": "lamb"}, "optimizer must be one of 'sgd', 'adamw', 'sam'"),
        ({"schedule": "step"}, "schedule must be one of 'cosine', 'linear', 'multistep', 'constant'; got 'step'"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"warmup_epochs": 3}, "warmup_epochs must be at most epochs"),
        ({"milestones": [5, 2]}, "milestones must be increasing"),
        ({"lr": -1.0}, "lr must be a finite real number >= 0"),
        # the optimizer's own checks, made by building it over a stand-in model before the data is loaded
        ({"optimizer": "sam", "rho": -1.0}, "rho must be a finite real number >= 0, got -1.0"),
        ({"optimizer": "ssam-f", "sparsity": 2.0}, r"sparsity must be a real number in \[0, 1\), got 2.0"),
        ({"optimizer": "sam", "base": "lion"}, "unknown base optimizer 'lion'; choose a torch.optim class"),
        ({"optimizer": "delta-sam", "num_probes": 0}, "num_probes must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, monkeypatch, bad, message):
    def load(*_):
        raise AssertionError("the data were loaded before the settings were checked")

    monkeypatch.setattr(vision, "build_task", load)
    with pytest.raises(ValueError, match=message):
        run(tiny(tmp_path, **bad))
    assert not (tmp_path / "run").exists()


def test_checking_the_optimizer_settings_leaves_the_random_state_alone(tmp_path, capsys):
    state = torch.get_rng_state()
    for name in ("sam-on", "ssam-d", "delta-sam", "msam"):
        loop.validate(TrainConfig(optimizer=name))
    assert torch.equal(torch.get_rng_state(), state)
    out = tmp_path / "c"  # compare checks every run's settings before it starts the first
    args = ["compare", "--optimizers", "sgd,sam", "--dataset", "synthetic", "--rho", "nan", "--out", str(out)]
    assert cli.main(args) == 2
    assert "rho must be a finite real number >= 0, got nan" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "argv, line",
    [
        ("train --dataset synthetic --batch-size 0",
         "samopt train: error: --batch-size must be an integer >= 1, got 0"),
        ("train --dataset synthetic --optimizer delta-sam --num-probes 0",
         "samopt train: error: --num-probes must be an integer >= 1, got 0"),
        ("train --dataset synthetic --optimizer ssam-f --sparsity 1.5",
         "samopt train: error: --sparsity must be a real number in [0, 1), got 1.5"),
        ("train --dataset synthetic --cutout -1",
         "samopt train: error: --cutout and --crop-padding must be >= 0, got -1"),
        ("compare --dataset synthetic --optimizers sgd,sam --label-smoothing 2",
         "samopt compare: error: --label-smoothing must be a real number in [0, 1], got 2.0"),
        ("train --dataset synthetic --max-grad-norm -1",
         "samopt train: error: --max-grad-norm must be none or a finite real number > 0, got -1.0"),
    ],
)  # fmt: skip
def test_the_command_line_names_a_refused_setting_by_its_flag(tmp_path, capsys, argv, line):
    assert cli.main([*argv.split(), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(line) and not (tmp_path / "run").exists()


def test_as_flags_renames_only_the_settings_named_as_fields():
    message = (
        "num_probes must be >= 1; checkpoint /tmp/batch_size/c.pt holds batch_size 64 and lr 0.1 (fisher_labels "
        "'batch_size', label_smoothing=0.1); --label-noise applies; model 'x'; seeds_per_run 2"
    )
    assert cli.as_flags(message, GlueConfig) == (
        "--num-probes must be >= 1; checkpoint /tmp/batch_size/c.pt holds --batch-size 64 and lr 0.1 (--fisher-labels "
        "'batch_size', --label-smoothing=0.1); --label-noise applies; model 'x'; seeds_per_run 2"
    )
    assert cli.as_flags("rho must be >= 0", TrainConfig) == "--rho must be >= 0"
    assert cli.as_flags("rhos must be >= 0", TrainConfig) == "rhos must be >= 0"  # not a setting
    none = "max_grad_norm must be None or a real number > 0, got None"  # the command line's word for None
    assert cli.as_flags(none, TrainConfig) == "--max-grad-norm must be none or a real number > 0, got None"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"label_smoothing": 1.5}, r"label_smoothing must be a real number in \[0, 1\], got 1.5"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be None or a finite real number > 0, got -1.0"),
        ({"workers": -1}, "workers must be an integer >= 0"),
        ({"dataset": "imagenet", "data_dir": "x", "cutout": 16}, "--cutout do\\(es\\) not apply to imagenet"),
        ({"model": "small-cnn"}, "model 'small-cnn' is for 28x28 images"),
        ({"dataset": "cifar10", "download": True}, "--download needs --data-dir"),
        ({"train_subset": 1000}, "train_subset must be at most the 320 training images, got 1000"),
    ],
)
def test_bad_image_settings(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        run(tiny(tmp_path, **bad))


def test_base_optimizers_whose_arguments_clash_with_sam():
    with pytest.raises(ValueError, match="base optimizer Adadelta has its own rho argument"):
        build_optimizer(TrainConfig(optimizer="sam", base="adadelta"), bn_net(), steps_per_epoch=1)


# ------------------------------------------------------------------ one step


def test_train_step_runs_each_optimizer_kind_and_returns_the_clean_pass():
    x, y = image_batch()
    amp = Amp("none", torch.device("cpu"))

    def loss_fn(logits, y, reduction="mean"):
        return torch.nn.functional.cross_entropy(logits, y, reduction=reduction)

    for name in ("sgd", "sam", "delta-sam"):
        torch.manual_seed(0)
        model = bn_net()
        cfg = TrainConfig(optimizer=name, estimator="probe", lr=0.1)
        opt = build_optimizer(cfg, model, steps_per_epoch=1)
        before = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            clean = model(x)
        loss, logits = train_step(opt, model, x, y, loss_fn, amp)
        assert torch.allclose(logits, clean, atol=1e-6), name  # the pass at w, not a probe or w + e
        assert loss == pytest.approx(float(loss_fn(clean, y)), rel=1e-5), name
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)), name


def test_plain_optimizer_clipping():
    x, y = image_batch()
    torch.manual_seed(0)
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(opt, model, x, y, torch.nn.functional.cross_entropy, Amp("none", torch.device("cpu")), 1e-3)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    assert step.norm() == pytest.approx(1e-3, rel=1e-4)  # lr 1: the update is the clipped gradient


# ------------------------------------------------------------------ runs, resume, interrupts


def _interrupt_at(monkeypatch, n: int) -> None:
    """Deliver a real SIGINT to this process during the n-th training step."""
    real, calls = loop.train_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # as a terminal's Ctrl-C
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)


def _weights(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize(
    "optimizer, stop, extra",
    [("ssam-f", 6, {}), ("ssam-d", 3, {}), ("delta-sam", 5, {}), ("sgd", 4, {}),
     ("sam", 3, {"ascend": "random", "ascend_prob": 0.5}), ("sam", 6, {"ascend": "adaptive"}), ("msam", 5, {}),
     ("sam-on", 3, {}), ("ssam-d", 6, {"granularity": "tensor"})],
)  # fmt: skip
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, optimizer, stop, extra):
    whole = run(tiny(tmp_path / "a", optimizer=optimizer, **extra))
    with monkeypatch.context() as m:
        _interrupt_at(m, stop)
        with pytest.raises(SystemExit) as e:
            run(tiny(tmp_path / "b", optimizer=optimizer, **extra))
    assert e.value.code == loop.EXIT_INTERRUPTED
    saved = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    # the step during which Ctrl-C came is finished, then saved (4 steps per epoch; after step 4, epoch 1 ends first)
    assert (saved["epoch"], saved["batch"]) == divmod(stop, 4)
    real, steps = loop.train_step, [0]

    def counted(*args, **kwargs):
        steps[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", counted)
    resumed = run(tiny(tmp_path / "b", optimizer=optimizer, resume=True, **extra))
    assert steps[0] == 2 * 4 - stop  # it continued, it did not start over
    if stop % 4:  # the interrupted epoch's time adds the part before the interrupt
        assert resumed["history"][stop // 4]["train_seconds"] >= saved["partial"]["seconds"] > 0
        assert resumed["history"][stop // 4]["train_cpu_seconds"] >= saved["partial"]["cpu_seconds"] > 0
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "passes_per_step", "ascent_fraction"):
        assert [r[key] for r in resumed["history"]] == [r[key] for r in whole["history"]], key
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_run_outputs(tmp_path):
    summary = run(tiny(tmp_path, optimizer="ssam-d"))
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["epochs"] == 2 and len(summary["history"]) == 2 and summary["config"]["optimizer"] == "ssam-d"
    assert tiny(tmp_path).rho is None and summary["config"]["rho"] == 0.05  # the default it ran at, recorded
    assert summary["score"] == "test_acc" and summary["final_score"] == summary["history"][-1]["test_acc"]
    assert summary["best_score"] == max(r["test_acc"] for r in summary["history"]) and summary["peak_memory_mib"] > 0
    assert summary["seconds_per_step"] == pytest.approx(summary["seconds_per_epoch"] / 4)
    cpu = [r["train_cpu_seconds"] for r in summary["history"]]
    assert all(c > 0 for c in cpu) and summary["cpu_seconds_per_epoch"] == pytest.approx(sum(cpu) / 2)
    assert summary["load_average"] == pytest.approx(sum(r["train_load_average"] for r in summary["history"]) / 2)
    assert summary["parameters"] == 308_826
    record = summary["history"][0]
    assert set(record) == {
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "train_seconds",
        "train_cpu_seconds",
        "train_load_average",
        "steps",
        "mask_density",
        "passes_per_step",
        "ascent_fraction",
        "forwards_per_step",
        "work",
    }
    assert record["mask_density"] == pytest.approx(0.5, abs=1e-3)
    assert (record["passes_per_step"], record["ascent_fraction"], record["forwards_per_step"]) == (2.0, 1.0, 0.0)
    assert record["work"]["steps"] == 4 and summary["history"][1]["work"]["steps"] == 8  # the running count
    assert (summary["passes_per_step"], summary["ascent_fraction"]) == (2.0, 1.0)


def test_ascend_every_k_halves_the_perturbed_passes_and_is_counted(tmp_path):
    summary = run(tiny(tmp_path, optimizer="sam", ascend="every", ascend_every=2))
    assert [(r["passes_per_step"], r["ascent_fraction"]) for r in summary["history"]] == [(1.5, 0.5)] * 2
    assert summary["passes_per_step"] == 1.5
    plain = run(tiny(tmp_path / "sgd", optimizer="sgd"))
    assert (plain["passes_per_step"], plain["history"][0]["passes_per_step"]) == (1.0, 1.0)
    late = run(tiny(tmp_path / "late", optimizer="ssam-d", ascend="late", ascend_from=0.75))  # SAM on the last 2 of 8
    assert [r["passes_per_step"] for r in late["history"]] == [1.0, 1.5]
    assert "mask_density" not in late["history"][0] and late["history"][1]["mask_density"] == pytest.approx(0.5, 1e-3)
    look = run(tiny(tmp_path / "look", optimizer="looksam"))  # SAM on steps 0 and 5 of 8, reuse on the others
    assert (look["config"]["ascend"], look["config"]["ascend_every"]) == ("every", 5)
    assert [r["passes_per_step"] for r in look["history"]] == [1.25, 1.25]
    assert resolve(None, {"optimizer": "looksam", "ascend": "adaptive"}).ascend == "adaptive"  # AE-LookSAM
    assert resolve(None, {"optimizer": "sam"}).ascend == "always"
    sub = run(tiny(tmp_path / "sub", optimizer="ssam-f", ascent_sub_batches=4))  # ascent on 16 of each 64 images
    assert [r["passes_per_step"] for r in sub["history"]] == [1.25, 1.25]
    assert sub["history"][0]["mask_density"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="ascend must be one of 'always', 'every', 'random', 'adaptive', 'late'; got"):
        run(tiny(tmp_path / "bad", optimizer="sam", ascend="often"))


def test_checkpoint_errors(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match=r"--resume: no checkpoint at .*checkpoint\.pt"):
        run(cfg.replace(resume=True))
    run(cfg)
    with pytest.raises(CheckpointError, match="already holds a checkpoint: pass --resume"):
        run(cfg)
    with pytest.raises(CheckpointError, match=r"does not match in model: saved 'resnet-small', now 'wrn16-4'"):
        run(cfg.replace(resume=True, model="wrn16-4"))
    peak = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["peak"]
    again = run(cfg.replace(resume=True, progress=True, workers=2))  # allowed changes; nothing left to train
    assert len(again["history"]) == 1 and again["peak_memory_mib"] >= peak > 0  # the training process's peak counts
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "device_type": "cuda"}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="does not match in device type: saved 'cuda', now 'cpu'"):
        run(cfg.replace(resume=True))
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot be read .*corrupt or not a samopt checkpoint"):
        run(cfg.replace(resume=True))
    torch.save({"format": 99}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a samopt train checkpoint of format 1"):
        run(cfg.replace(resume=True))


# ------------------------------------------------------------------ command line


def samopt_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "samopt.train.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_flags_round_trip():
    parser = cli.build_parser()
    ns = parser.parse_args(
        [
            "train",
            "--rho",
            "0.2",
            "--no-flip",
            "--max-grad-norm",
            "none",
            "--milestones",
            "3,7",
            "--train-subset",
            "100",
            "--base",
            "adamw",
        ]
    )
    explicit = cli._explicit(ns)
    assert explicit == {
        "rho": 0.2,
        "flip": False,
        "max_grad_norm": None,
        "milestones": [3, 7],
        "train_subset": 100,
        "base": "adamw",
    }
    assert cli._explicit(parser.parse_args(["train", *config.to_flags(explicit)])) == explicit


def test_cli_errors_name_the_valid_choices(tmp_path):
    for flag, bad, valid in (
        ("--dataset", "mnist", ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")),
        ("--model", "vgg16", tuple(MODELS)),
        ("--optimizer", "lamb", ("sgd", "adamw", "sam", "asam", "ssam-f", "ssam-d", "random-mask", "delta-sam")),
        ("--recipe", "nope", tuple(RECIPES)),
        ("--label-noise-mode", "asym", ("symmetric", "pairflip")),
    ):
        r = samopt_cli("train", flag, bad)
        message = r.stderr.splitlines()[0]
        assert r.returncode == 2 and f"argument {flag}: invalid choice: '{bad}' (choose from" in message
        assert all(name in message for name in valid), message
    r = samopt_cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "samopt train: error: cifar10 files not found" in r.stderr and "--download" in r.stderr
    r = samopt_cli("compare", "--optimizers", "sgd,lamb", "--dataset", "synthetic")
    assert r.returncode == 2 and "unknown optimizer(s) ['lamb'] in --optimizers" in r.stderr
    r = samopt_cli("glue", "--task", "stsb", "--label-noise", "0.2")  # no label noise on GLUE (nor regression)
    assert r.returncode == 2 and "unrecognized arguments: --label-noise 0.2 (label noise is for the image" in r.stderr
    r = samopt_cli("glue-compare", "--task", "mrpc", "--label-noise-mode", "pairflip")
    assert r.returncode == 2 and "--label-noise-mode pairflip (label noise is for the image data sets" in r.stderr
    r = samopt_cli("train", "--dataset", "imagenet", "--data-dir", str(tmp_path), "--label-noise", "0.2")
    assert r.returncode == 2 and "--label-noise applies to the data sets held in memory" in r.stderr


@pytest.mark.parametrize(
    "argv, first_line",
    [
        ("train --optimizer sma", "samopt train: error: argument --optimizer: invalid choice: 'sma' (choose from sgd, "
         "adamw, sam, asam, ssam-f, ssam-d, random-mask, sam-on, looksam, gsam, friendly-sam, vasso, wsam, msam, "
         "delta-sam); did you mean 'sam'?"),
        ("train --optimzer sam", "samopt train: error: unrecognized arguments: --optimzer sam; did you mean "
         "'--optimizer'?"),
        ("train --optim sam", "samopt train: error: unrecognized arguments: --optim sam; did you mean '--optimizer'?"),
        ("trian", "samopt: error: argument command: invalid choice: 'trian' (choose from train, compare, glue, "
         "glue-compare, sharpness, recipes, optimizers); did you mean 'train'?"),
        ("compare --optimizer sam", "samopt compare: error: unrecognized arguments: --optimizer sam (this command "
         "runs several: --optimizers)"),
        ("glue --bn both", "samopt glue: error: unrecognized arguments: --bn both (GLUE's transformers have no "
         "BatchNorm)"),
        ("train --bn second", "samopt train: error: argument --bn: invalid choice: 'second' (choose from first, "
         "both)"),
        ("glue-compare --task mrcp", "samopt glue-compare: error: argument --task: invalid choice: 'mrcp' (choose "
         "from cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte); did you mean 'mrpc'?"),
        ("glue --recipe fmnist-demo", "samopt glue: error: unrecognized arguments: --recipe fmnist-demo (recipes are "
         "the image presets of `samopt train` and `compare`; `samopt glue` starts from the BERT fine-tuning "
         "defaults)"),
        ("train --milestones 60,x", "samopt train: error: argument --milestones: expected comma-separated integers "
         "(60,120,160), got '60,x'"),
        ("compare --max-grad-norm big", "samopt compare: error: argument --max-grad-norm: expected float or none, "
         "got 'big'"),
    ],
)  # fmt: skip
def test_cli_errors_are_two_lines_with_the_values_and_a_suggestion(capsys, argv, first_line):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv.split())
    err = capsys.readouterr().err.splitlines()
    command = first_line.split(":")[0]
    assert exit_.value.code == 2 and err == [first_line, f"see `{command} --help` for every flag and its values"]


def test_every_choice_flag_lists_its_values_and_every_setting_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("train", "compare", "glue", "glue-compare"):
        run_settings = next(g for g in commands[name]._action_groups if g.title.startswith("run settings"))
        flags = [a for a in run_settings._group_actions if a.dest != "recipe"]
        assert len(flags) > 50, name  # every setting (a missing group would pass the loop below)
        for action in flags:
            assert "default" in action.help, (name, action.option_strings)
            if action.choices is not None:
                assert all(str(c) in action.help for c in action.choices), (name, action.option_strings)
        given = {s for a in flags for s in a.option_strings}
        assert ("--optimizer" in given) is (name in ("train", "glue")), name  # compare: --optimizers only
        assert ("--bn" in given) is name.startswith(("train", "compare")), name  # no BatchNorm in GLUE's models
    for name in ("bn", "granularity", "fisher_labels", "drop", "grow", "estimator", "optimizer", "ascend"):
        action = next(a for a in commands["train"]._actions if a.dest == name)
        assert action.choices, name  # refused by the parser, with the values listed


def test_recipes_command_lists_every_recipe():
    r = samopt_cli("recipes")
    assert r.returncode == 0
    for name, recipe in RECIPES.items():
        assert name in r.stdout and recipe.source in r.stdout


def test_compare_runs_tables_plots_and_skips_finished_runs(tmp_path):
    out = tmp_path / "cmp"
    flags = config.to_flags({**TINY, "epochs": 1, "out": str(out)})
    r = samopt_cli("compare", "--optimizers", "sgd,sam", "--seeds", "2", *flags)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "compare.json").read_text())
    assert list(results) == ["sgd", "sam"] and [s["seed"] for s in results["sam"]] == [0, 1]
    table = (out / "compare.md").read_text().splitlines()
    header = (
        "| optimizer | seeds | final test acc % | best test acc % | best epoch | wall time s | s/epoch | x sgd | "
        "CPU s/epoch | x sgd (CPU) | passes/step | peak memory"
    )
    assert table[0].startswith(header)
    assert table[2].startswith("| sgd | 2 | ") and table[3].startswith("| sam | 2 | ")
    cells = [[c.strip() for c in row.split("|")] for row in table[2:4]]
    assert [c[11] for c in cells] == ["1.00", "2.00"]  # passes per step
    assert cells[0][10] == "1.00" and float(cells[1][10]) > 1  # CPU time relative to SGD's
    summaries = {n: [json.loads((out / f"{n}-s{s}" / "summary.json").read_text()) for s in (0, 1)] for n in results}
    cpu = [statistics.mean(r["cpu_seconds_per_epoch"] for r in summaries[n]) for n in ("sgd", "sam")]
    assert [float(c[9]) for c in cells] == [round(v, 1) for v in cpu]
    assert all(r["load_average"] >= 0 and r["cpu_seconds_per_epoch"] > 0 for rs in summaries.values() for r in rs)
    reading = table[5]  # after the table and a blank line
    assert reading.startswith("How to read this: one row per optimizer;")
    assert "the mean ± standard deviation over 2 seeds" in reading and "the machine's load average" in reading
    assert "| 1.00 |" in table[2] and " of 1 |" in table[2]  # the best epoch, of 1
    # the CSV holds each run's numbers, as its summary.json has them
    with open(out / "compare.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["optimizer"], int(r["seed"])) for r in csv_rows] == [("sgd", 0), ("sgd", 1), ("sam", 0), ("sam", 1)]
    for row in csv_rows:
        summary = json.loads((out / f"{row['optimizer']}-s{row['seed']}" / "summary.json").read_text())
        assert float(row["final_score"]) == summary["final_score"] and float(row["best_score"]) == summary["best_score"]
        assert float(row["seconds_per_epoch"]) == summary["seconds_per_epoch"] and int(row["best_epoch"]) == 1
        assert float(row["passes_per_step"]) == summary["passes_per_step"]
    for png in ("accuracy.png", "cost.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plots: " in r.stdout and str(out / "accuracy.png") in r.stdout
    r = samopt_cli("compare", "--optimizers", "sgd", "--seeds", "1", *flags, "--lr", "0.5")
    assert r.returncode == 2 and "holds a finished run with other settings (lr: saved 0.05, now 0.5)" in r.stderr
    r = samopt_cli("compare", "--optimizers", "sam,sam", *flags)
    assert r.returncode == 2 and "--optimizers names ['sam'] more than once" in r.stderr
    r = samopt_cli("compare", "--optimizers", "sgd,sam", *flags, "--epochs", "0")
    assert r.returncode == 2 and "epochs must be an integer >= 1, got 0" in r.stderr and "== sgd" not in r.stdout
    stamp = (out / "sam-s1" / "summary.json").stat().st_mtime_ns
    again = samopt_cli("compare", "--optimizers", "sgd,sam", "--seeds", "2", *flags)
    assert again.returncode == 0 and "== sam" not in again.stdout  # nothing re-run
    assert (out / "sam-s1" / "summary.json").stat().st_mtime_ns == stamp


def test_the_installed_samopt_command_runs():
    script = Path(sys.executable).parent / "samopt"  # the console script the package installs into the environment
    r = subprocess.run([str(script), "optimizers"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("sgd ") and "Foret et al., ICLR 2021" in r.stdout
    assert "--ascend: which steps of the SAM family" in r.stdout and "AE-SAM, Jiang, Yang, Zhang and Kwok" in r.stdout


def test_a_setting_missing_from_an_older_checkpoint_counts_as_its_default():
    cfg = TrainConfig()
    saved = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sync"}  # written before --sync existed
    assert config.config_differences(saved, cfg) == []
    assert config.config_differences(saved, cfg.replace(sync="local")) == ["sync: saved 'global', now 'local'"]


def test_a_run_records_the_rho_it_uses_and_a_changed_default_is_a_difference():
    sam, glue_sam = TrainConfig(optimizer="sam"), GlueConfig(optimizer="sam")
    assert (config.saved_config(sam)["rho"], config.saved_config(glue_sam)["rho"]) == (0.05, 0.005)  # the defaults
    assert config.saved_config(sam.replace(rho=0.2))["rho"] == 0.2 and config.saved_config(TrainConfig())["rho"] is None
    assert config.saved_config(GlueConfig(optimizer="msam"))["rho"] is None  # no GLUE default: validate refuses it
    saved = config.saved_config(glue_sam)
    assert config.config_differences(saved, glue_sam) == []
    assert config.config_differences(saved, glue_sam.replace(rho=0.005)) == []  # the default, given: the same run
    older = saved | {"rho": 0.01}  # a run at an older samopt's default, resumed after the default changed
    assert config.config_differences(older, glue_sam) == ["rho: saved 0.01, now 0.005"]
    assert config.config_differences(older, glue_sam.replace(rho=0.01)) == []  # giving the old value resumes it
    unknown = dataclasses.asdict(glue_sam)  # written before the rho was recorded: counts as today's default
    assert unknown["rho"] is None and config.config_differences(unknown, glue_sam) == []
    assert config.config_differences(unknown, glue_sam.replace(rho=0.01)) == ["rho: saved None, now 0.01"]


def test_compare_under_torchrun_is_refused_with_the_way_out(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["compare", "--optimizers", "sgd", "--dataset", "synthetic"]) == 2
    assert "under torchrun, launch each `samopt train` / `samopt glue` run with torchrun" in capsys.readouterr().err


def test_a_diverging_run_stops_with_a_clear_error_not_a_traceback(tmp_path, capsys):
    with pytest.raises(FloatingPointError, match=r"the training diverged in epoch 1, step \d+ \(non-finite gradient"):
        run(tiny(tmp_path, optimizer="sam", lr=1e35, epochs=1))
    code = cli.main(["train", "--dataset", "synthetic", "--synthetic-size", "320", "--train-subset", "256",
                     "--batch-size", "64", "--epochs", "1", "--optimizer", "sam", "--lr", "1e35", "--no-progress",
                     "--out", str(tmp_path / "cli")])  # fmt: skip
    assert code == 2 and "samopt train: error: the training diverged" in capsys.readouterr().err


def _summary(seed, accs, noisy=None):
    """A run's summary.json, as samopt train writes it, with the given test accuracy (and noise fit) per epoch."""
    history = [
        {
            "epoch": e + 1,
            "test_loss": 1.0 - a,
            "test_acc": a,
            **({} if noisy is None else {"flipped_acc_noisy": noisy[e]}),
        }
        for e, a in enumerate(accs)
    ]
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    return {
        "seed": seed, "epochs": len(accs), "score": "test_acc", "final_score": accs[-1], "best_score": max(accs),
        "final": final, "history": history, "seconds_per_epoch": 2.0, "seconds_per_step": 0.1, "wall_seconds": 9.0,
        "peak_memory_mib": 100.0, "peak_memory_kind": "process peak RSS",
    }  # fmt: skip


def test_compare_reports_the_best_epoch_and_plots_loss_and_memorisation(tmp_path):
    from PIL import Image

    from samopt.train.compare import plot, table

    noisy = {
        "sgd": [_summary(0, [0.5, 0.8, 0.7], noisy=[0.1, 0.2, 0.4])],
        "sam": [_summary(0, [0.5, 0.7, 0.75], [0.1, 0.1, 0.1])],
    }
    text = table(noisy)
    assert "| sgd | 1 | 70.00 | 80.00 | 2 of 3 | 40.00 |" in text  # final, best, best epoch, noise fitted at the end
    assert "±" not in text  # one seed has no spread to show
    accuracy, _ = plot(noisy, tmp_path)
    assert Image.open(accuracy).size[0] > 3 * 5 * 120  # three panels: accuracy, loss and the noisy labels fitted
    clean = {"sgd": [_summary(0, [0.5, 0.8]), _summary(1, [0.7, 0.6])]}
    assert "| sgd | 2 | 70.00 ± 14.14 | 75.00 ± 7.07 | 2 ± 1 of 2 |" in table(clean)  # best at epochs 2 and 1
    plot(clean, tmp_path)
    assert Image.open(tmp_path / "accuracy.png").size[0] < 3 * 5 * 120  # two panels without label noise
    assert "| n/a | n/a |" in table(clean)  # runs from before CPU time was recorded


def test_the_reading_of_a_comparison_says_what_its_numbers_show():
    from samopt.train.compare import reading

    one = {"sgd": [_summary(0, [0.5, 0.8, 0.7], [0.1, 0.2, 0.4])], "sam": [_summary(0, [0.5, 0.7, 0.75], [0.1] * 3)]}
    text = reading(one)
    assert (
        "One seed: no spread is measured, so no difference here is shown to be more than chance (the highest "
        "final test acc is sam's)"
        in text
        and "The flipped columns are the training images" in text
    )
    assert "Wall time also counts whatever else the machine ran; CPU time" in text  # no load recorded
    three = {  # SAM 10 points above SGD, seed spreads of 1 point
        "sgd": [_summary(s, [0.6 + d]) | {"load_average": 1.5 + s} for s, d in enumerate((-0.01, 0, 0.01))],
        "sam": [_summary(s, [0.7 + d]) | {"load_average": 1.0} for s, d in enumerate((-0.01, 0, 0.01))],
    }
    text = reading(three)
    assert (
        "mean ± standard deviation over 3 seeds. The highest final test acc is sam's, +10.00 points from sgd's: "
        "more than twice the largest seed spread (1.00 points)." in text
    )
    assert "(the machine's load average during the runs: 1.0 to 3.5)" in text
    three["sam"] = [_summary(s, [0.6 + d]) for s, d in enumerate((0.0, 0.02, 0.04))]  # 2 points up, spread 2
    assert "+2.00 points from sgd's: not more than twice the largest seed spread (2.00 points)" in reading(three)
    alone = reading({"adamw": three["sgd"]})  # one optimizer: a spread, and no comparison with itself
    assert "over 3 seeds. One optimizer, so nothing is compared; its seed spread is 1.00 points." in alone
    assert "highest" not in alone and "from sgd's" not in alone
    single = reading({"sgd": one["sgd"]})
    assert "One seed and one optimizer: nothing is compared and no spread is measured; --seeds 3 measures it." in single
    assert "highest" not in single


def test_fashion_mnist_without_a_recipe_is_cpu_sized_and_a_dry_run_prints_its_plan(tmp_path, capsys):
    from tests.test_train import write_fashion_mnist

    assert (resolve(None, {}).model, resolve(None, {}).epochs, resolve(None, {}).lr) == ("small-cnn", 5, 0.02)
    assert (resolve(None, {"epochs": 2}).model, resolve(None, {"model": "resnet18"}).epochs) == ("small-cnn", 5)
    cifar = resolve(None, {"dataset": "cifar10"})
    assert (cifar.model, cifar.epochs) == (TrainConfig.model, TrainConfig.epochs)  # sized for a GPU: no change
    assert resolve("fmnist-noisy", {}).epochs == 40  # a recipe's settings, not these
    (tmp_path / "fm").mkdir()
    write_fashion_mnist(tmp_path / "fm", n=(300, 120))
    out = tmp_path / "run"
    assert cli.main(["train", "--data-dir", str(tmp_path / "fm"), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[0].startswith("samopt train --label-smoothing 0.0 --optimizer sgd ")
        and "--model small-cnn" in printed[0]
    )
    assert (
        printed[1]
        == f"plan: fashion-mnist, small-cnn, sgd: 5 epochs x 2 steps of batch 128 = 10 steps on cpu; results in {out} "
        "(--epochs, --model or --recipe change it)"
    )
    assert len(printed) == 2 and not out.exists()  # nothing trained, nothing written
    # a SAM-family optimizer: the rho it will use, its own default when --rho is not given, or --rho
    for flags, said in (([], "asam at rho 0.5"), (["--rho", "0.07"], "asam at rho 0.07")):
        assert cli.main(["train", "--data-dir", str(tmp_path / "fm"), "--dry-run", "--optimizer", "asam", *flags]) == 0
        assert f"plan: fashion-mnist, small-cnn, {said}: 5 epochs" in capsys.readouterr().out


def test_a_run_prints_its_plan_and_after_a_few_steps_its_time(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "ESTIMATE_AFTER", 3)
    run(tiny(tmp_path))
    printed = capsys.readouterr().out.splitlines()
    out = tmp_path / "run"
    assert (
        printed[0]
        == f"plan: synthetic, resnet-small, sgd: 2 epochs x 4 steps of batch 64 = 8 steps on cpu; results in {out} "
        "(--epochs, --model or --recipe change it)"
    )
    assert re.fullmatch(
        r"[0-9.e-]+ s per step over the first 3: about \d+ s for the 8 training steps \(evaluation "
        r"not counted\)",
        printed[1],
    ), printed[1]
    run(tiny(tmp_path).replace(resume=True))
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"plan: synthetic, resnet-small, sgd: 2 epochs x 4 steps of batch 64 = 8 steps on cpu; "
        f"results in {out} (resumed: 0 of 8 steps left)"
    ]


def test_the_plan_counts_one_epoch_and_one_step_in_the_singular(tmp_path):
    line = loop.plan(tiny(tmp_path).replace(epochs=1), 1, torch.device("cpu"))
    assert line.startswith("plan: synthetic, resnet-small, sgd: 1 epoch x 1 step of batch 64 = 1 step on cpu; ")
    line = loop.plan(tiny(tmp_path).replace(epochs=1000), 20, torch.device("cpu"))
    assert ": 1,000 epochs x 20 steps of batch 64 = 20,000 steps on cpu; " in line


def test_a_noisy_compare_reports_the_memorisation_of_each_run(tmp_path):
    out = tmp_path / "cmp"
    flags = config.to_flags({**TINY, "epochs": 1, "out": str(out), "label_noise": 0.25})
    r = samopt_cli("compare", "--optimizers", "sgd", "--seeds", "2", *flags)
    assert r.returncode == 0, r.stderr
    summaries = [json.loads((out / f"sgd-s{s}" / "summary.json").read_text()) for s in (0, 1)]
    metrics = ("flipped_acc_noisy", "flipped_acc_true")
    with open(out / "compare.csv") as f:
        csv_rows = list(csv.DictReader(f))
    for row, summary in zip(csv_rows, summaries, strict=True):
        assert [float(row[f"final_{m}"]) for m in metrics] == [summary["final"][m] for m in metrics]
    header, _, sgd = ([c.strip() for c in row.split("|")] for row in (out / "compare.md").read_text().splitlines()[:3])
    assert header[6:8] == ["final flipped acc noisy %", "final flipped acc true %"]
    for m, cell in zip(metrics, sgd[6:8], strict=True):
        values = [100 * s["final"][m] for s in summaries]
        assert cell == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_the_demo_recipe_runs_a_smoke_epoch_with_label_noise(tmp_path):
    from tests.test_train import write_fashion_mnist

    (tmp_path / "fm").mkdir()
    write_fashion_mnist(tmp_path / "fm", n=(300, 120))
    cfg = resolve(
        "fmnist-demo",
        {"optimizer": "sam", "data_dir": str(tmp_path / "fm"), "train_subset": 256, "test_subset": 100,
         "epochs": 1, "progress": False, "out": str(tmp_path / "run")},
    )  # fmt: skip
    assert (cfg.label_noise, cfg.rho, cfg.model, cfg.flip, cfg.crop_padding) == (0.4, 0.1, "small-cnn", False, 0)
    record = run(cfg)["history"][0]
    assert {"test_acc", "flipped_acc_noisy", "flipped_acc_true"} <= set(record)
    assert record["steps"] == 2  # 256 images, batch 128


def test_msam_runs_evaluate_and_save_the_true_weights(tmp_path, monkeypatch):
    optimizers, tasks, checks = [], [], []
    real_build, real_task = loop.build_optimizer, vision.build_task

    def build_optimizer(*args, **kwargs):
        optimizers.append(real_build(*args, **kwargs))
        return optimizers[-1]

    def build_task(cfg, device):
        task = real_task(cfg, device)
        tasks.append(task)
        evaluate = task.evaluate

        def recording(model, amp):
            now = [p.detach().clone() for p in model.parameters()]
            with optimizers[-1].true_weights():  # w: a no-op if evaluate already runs inside true_weights()
                checks.append(all(torch.equal(a, p) for a, p in zip(now, model.parameters(), strict=True)))
            return evaluate(model, amp)

        task.evaluate = recording
        return task

    monkeypatch.setattr(loop, "build_optimizer", build_optimizer)
    monkeypatch.setattr(vision, "build_task", build_task)
    summary = run(tiny(tmp_path, optimizer="msam", epochs=1))
    assert summary["passes_per_step"] == 1.0  # one forward/backward per step
    assert checks == [True] and len(optimizers) == 2  # the stand-in validate() builds, then the run's
    opt = optimizers[-1]
    assert opt._swap.moved  # the weights rest at w~ ...
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    with opt.true_weights():  # ... and the checkpoint holds w
        assert all(torch.equal(saved[k], p) for k, p in tasks[0].model.named_parameters())
