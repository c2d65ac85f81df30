"""The ``samopt`` command: ``samopt train``, ``compare``, ``glue``, ``glue-compare``, ``recipes`` and ``optimizers``.

Every field of :class:`~samopt.train.config.TrainConfig` is a flag (``--weight-decay``,
``--no-flip``, ``--max-grad-norm none``); ``--recipe NAME`` fills in a preset first and
explicit flags override it.

Example::

    samopt train --recipe fmnist-demo --optimizer ssam-f
    samopt compare --recipe fmnist-demo --optimizers sgd,sam,ssam-f,ssam-d,delta-sam --seeds 3
    samopt recipes
    samopt optimizers
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, cast

from samopt.sam import SYNC_MODES
from samopt.train import data as datasets
from samopt.train.compare import compare
from samopt.train.config import RECIPES, GlueConfig, RunConfig, TrainConfig, resolve, to_flags
from samopt.train.glue import TASKS
from samopt.train.lock import DirectoryInUseError
from samopt.train.loop import EXIT_INTERRUPTED, SCHEDULES, CheckpointError, run
from samopt.train.models import MODELS
from samopt.train.optimizers import AMP_MODES, ASCEND, ASCEND_POLICIES, NAMES, OPTIMIZERS

__all__ = ["build_parser", "config_args", "main"]

_CHOICES = {
    "optimizer": NAMES,
    "schedule": SCHEDULES,
    "amp": AMP_MODES,
    "sync": SYNC_MODES,
    "ascend": ASCEND,
}
_IMAGE_CHOICES = {
    "dataset": datasets.DATASETS,
    "model": tuple(MODELS),
    "label_noise_mode": datasets.NOISE_MODES,
}
_GLUE_CHOICES = {"task": tuple(TASKS)}
_GLUE_HELP = {
    "data_dir": "the task's folder, holding train.tsv and the dev file(s) in the GLUE layout",
    "model": "all-MiniLM-L6-v2 (packaged, offline) or any local or Hugging Face hub path",
    "max_length": "tokens per example (longer pairs are truncated)",
    "train_subset": "fine-tune on the first N examples of a fixed shuffle of train.tsv",
}
_HELP = {
    "dataset": "data set",
    "data_dir": "directory holding the data set's files (Fashion-MNIST: Debian's location by default)",
    "download": "download Fashion-MNIST or CIFAR into --data-dir if missing",
    "train_subset": "train on the first N images of a fixed shuffle of the training set",
    "test_subset": "evaluate on the first N images of a fixed shuffle of the test set (faster; the same for every run)",
    "base": "base optimizer of the SAM family: any torch.optim class name (sgd, adamw, ...)",
    "rho": "perturbation radius (default 0.05, on GLUE 0.01; 0.5 and 0.1 for asam; see `samopt optimizers`)",
    "mask_interval": "epochs between mask updates (ssam-f, ssam-d)",
    "num_samples": "examples in SSAM-F's Fisher estimate",
    "estimator": "delta-sam's per-example norm estimator: probe, logit or exact",
    "alpha": "delta-sam's weight exponent (0 is SAM)",
    "milestones": "comma-separated epochs at which multistep multiplies the lr by --gamma",
    "out": "output directory (default runs/<dataset>-<model>-<optimizer>-s<seed>)",
    "resume": "continue the run in --out from its checkpoint",
    "device": "auto, cpu, cuda or cuda:N",
    "sync": "under torchrun, the SAM family's perturbation from the all-reduced gradient or each rank's own",
    "ascend": "which steps of the SAM family run the perturbed pass (the others cost one forward/backward): always, "
    "every --ascend-every steps, at random (--ascend-prob), adaptive (AE-SAM, --ae-*) or late (from --ascend-from)",
    "ascend_every": "--ascend every: the period k (Composer's advice: scale --rho with k)",
    "ascend_prob": "--ascend random: the probability of a SAM step (at the start)",
    "ascend_prob_end": "--ascend random: the probability at the end of training, along a half cosine (none: constant)",
    "ascend_from": "--ascend late: the fraction of the training steps taken by the base optimizer before SAM starts",
    "ae_lambda1": "--ascend adaptive: SAM when ||g||^2 >= mean + c std, c linear from this at the start ...",
    "ae_lambda2": "... to this at the end",
    "ae_decay": "--ascend adaptive: decay of the moving mean and variance of ||g||^2",
    "look_alpha": "looksam: the weight of the reused direction (0.7 in the paper)",
    "ascent_sub_batches": "the SAM family's ascent gradient from the first 1/M of each batch, the update from all "
    "of it "
    "(Bahri et al., ACL 2022: about 1.25x the base cost at M = 4)",
    "label_noise": "fraction of the training labels replaced, in [0, 1) (the test set stays clean)",
    "label_noise_mode": "symmetric (another class, uniformly) or pairflip (class c to c + 1)",
    "label_noise_seed": "seed of the noise: which labels change, and into what (not the run's seed)",
}


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def config_args(parser: argparse.ArgumentParser, kind: type[RunConfig] = TrainConfig) -> None:
    """Add one flag per field of ``kind``, defaulting to "not given" so that recipes can fill them in."""
    group = parser.add_argument_group("run settings" + (" (override the recipe)" if kind is TrainConfig else ""))
    if kind is TrainConfig:
        group.add_argument(
            "--recipe", choices=tuple(RECIPES), metavar="NAME", help="preset to start from (see `samopt recipes`)"
        )
    hints = typing.get_type_hints(kind)
    glue = kind is GlueConfig
    choices = {**_CHOICES, **(_GLUE_CHOICES if glue else _IMAGE_CHOICES)}
    helps = {**_HELP, **(_GLUE_HELP if glue else {})}
    for f in dataclasses.fields(kind):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helps.get(f.name)}
        args = typing.get_args(hint)
        if hint is bool or (bool in args):
            kw["action"] = argparse.BooleanOptionalAction
        elif hint == list[int]:
            kw["type"] = _int_list
        else:
            kind = next(a for a in (*args, hint) if a in (int, float, str))
            kw["type"] = _none_or(kind) if type(None) in args else kind
            if f.name in choices:
                kw["choices"], kw["metavar"] = choices[f.name], f.name.upper()
                kw["help"] = f"{helps.get(f.name, f.name)}: {', '.join(choices[f.name])}"
        if kw["help"] is None:
            factory = cast(Callable[[], Any], f.default_factory)
            default = f.default if f.default is not dataclasses.MISSING else factory()
            kw["help"] = f"default {default}"
        group.add_argument(flag, **kw)


def _explicit(ns: argparse.Namespace, kind: type[RunConfig] = TrainConfig) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(kind)}
    return {k: v for k, v in vars(ns).items() if k in names}


def _recipes() -> None:
    width = max(map(len, RECIPES))
    pad = " " * width
    for name, r in RECIPES.items():
        print(f"{name:<{width}}  {r.description}")
        print(f"{pad}  source: {r.source}")
        print(f"{pad}  {' '.join(to_flags(r.settings))}")
        groups: dict[str, list[str]] = {}
        for optimizer, settings in r.per_optimizer.items():
            groups.setdefault(" ".join(to_flags(settings)), []).append(optimizer)
        for flags, optimizers in groups.items():
            print(f"{pad}  with {', '.join(optimizers)}: {flags}")
        print()


def _optimizers() -> None:
    width = max(map(len, OPTIMIZERS))
    for name, s in OPTIMIZERS.items():
        rho = f"; default rho {s.rho}" if s.rho is not None else ""
        rho += f" (on GLUE {s.glue_rho})" if s.glue_rho is not None else ""
        own = f"; by default {' '.join(to_flags(s.settings))}" if s.settings else ""
        print(f"{name:<{width}}  {s.summary} ({s.citation}{rho}{own}; tasks: {', '.join(s.tasks)})")
    print("\n--ascend: which steps of the SAM family (but delta-sam) run the perturbed pass; the others cost one pass")
    for name, (summary, citation, advice) in ASCEND_POLICIES.items():
        print(f"{name:<{width}}  {summary} ({citation}){'; ' + advice if advice else ''}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samopt", description="Sharpness-aware training from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="one training run", description="Train one model with one optimizer.")
    config_args(train)
    compare = sub.add_parser(
        "compare",
        help="several optimizers x seeds, then a table and plots",
        description="Run `samopt train` for each optimizer and seed (skipping finished runs, resuming "
        "interrupted ones), then write compare.md, compare.json and PNG plots into --out.",
    )
    compare.add_argument("--optimizers", default="sgd,sam,ssam-f,ssam-d,delta-sam", help="comma-separated names")
    compare.add_argument("--seeds", type=int, default=1, help="number of seeds: seed, seed+1, ...")
    config_args(compare)
    glue = sub.add_parser(
        "glue",
        help="fine-tune a pretrained transformer on a GLUE task",
        description="Fine-tune a Hugging Face sequence classifier on one GLUE task and report its official "
        "dev metrics each epoch (needs `pip install 'samopt[glue]'`).",
    )
    config_args(glue, GlueConfig)
    glue_compare = sub.add_parser(
        "glue-compare",
        help="several optimizers x seeds on a GLUE task, then a table and plots",
        description="`samopt compare` for `samopt glue` runs.",
    )
    glue_compare.add_argument("--optimizers", default="adamw,sam,ssam-f,delta-sam", help="comma-separated names")
    glue_compare.add_argument("--seeds", type=int, default=1, help="number of seeds: seed, seed+1, ...")
    config_args(glue_compare, GlueConfig)
    sub.add_parser("recipes", help="list the presets of --recipe")
    sub.add_parser("optimizers", help="list the optimizers and --ascend policies, with their papers and settings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("recipes", "optimizers"):
        (_recipes if args.command == "recipes" else _optimizers)()
        return 0
    kind = GlueConfig if args.command.startswith("glue") else TrainConfig
    recipe = getattr(args, "recipe", None)
    try:
        if args.command.endswith("compare") and os.environ.get("WORLD_SIZE", "1") != "1":
            raise ValueError(
                "compare runs its runs one after another in one process; under torchrun, launch each "
                "`samopt train` / `samopt glue` run with torchrun instead"
            )
        if args.command in ("train", "glue"):
            summary = run(resolve(recipe, _explicit(args, kind), kind))
            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
                print(
                    f"final {summary['score']} {100 * summary['final_score']:.2f} (best "
                    f"{100 * summary['best_score']:.2f}), {summary['seconds_per_epoch']:.1f} s/epoch; "
                    f"results in {summary['out']}"
                )
        else:
            command = "glue" if kind is GlueConfig else "train"
            compare(recipe, _explicit(args, kind), args.optimizers.split(","), args.seeds, command)
    except (ValueError, CheckpointError, DirectoryInUseError, ImportError, OSError, FloatingPointError) as e:
        print(f"samopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training started): stop at once, quietly
        again = "run the same command again" if args.command.endswith("compare") else "add --resume"
        print(
            f"\nsamopt {args.command}: stopped at once; every checkpoint saved before is intact ({again} to continue)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
