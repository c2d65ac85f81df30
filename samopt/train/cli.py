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
import difflib
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from samopt.delta import ESTIMATORS
from samopt.masks import DROP_SCORES, FISHER_LABELS, GRANULARITIES, GROW_SCORES
from samopt.sam import BN_MODES, SYNC_MODES
from samopt.train import data as datasets
from samopt.train.compare import compare
from samopt.train.config import RECIPES, GlueConfig, RunConfig, TrainConfig, flag, resolve, to_flags
from samopt.train.glue import TASKS
from samopt.train.lock import DirectoryInUseError
from samopt.train.loop import EXIT_INTERRUPTED, SCHEDULES, CheckpointError, dry_run, run
from samopt.train.models import MODELS
from samopt.train.optimizers import AMP_MODES, ASCEND, ASCEND_POLICIES, NAMES, OPTIMIZERS
from samopt.train.sharpness import MEASURES, Settings, interpolate_runs, measure, run_landscape

__all__ = ["build_parser", "config_args", "main", "settings_from", "sharpness_args"]

_CHOICES = {
    "optimizer": NAMES,
    "schedule": SCHEDULES,
    "amp": AMP_MODES,
    "sync": SYNC_MODES,
    "ascend": ASCEND,
    "granularity": GRANULARITIES,
    "fisher_labels": FISHER_LABELS,
    "drop": DROP_SCORES,
    "grow": GROW_SCORES,
    "estimator": ESTIMATORS,
}
_IMAGE_CHOICES = {
    "dataset": datasets.DATASETS,
    "model": tuple(MODELS),
    "label_noise_mode": datasets.NOISE_MODES,
    "bn": BN_MODES,
}
#: Settings a kind of run has but no flag of its command, and why: GLUE's transformers have no BatchNorm.
_NO_FLAG: dict[type[RunConfig], dict[str, str]] = {GlueConfig: {"bn": "GLUE's transformers have no BatchNorm"}}
#: Settings of other kinds of run that a kind refuses, and why (label noise is for the image data sets only).
_NOT_HERE: dict[type[RunConfig], dict[str, str]] = {
    GlueConfig: {
        **dict.fromkeys(
            ("label_noise", "label_noise_mode", "label_noise_seed"),
            "label noise is for the image data sets of `samopt train` and `compare`; GLUE tasks take none",
        ),
        "recipe": "recipes are the image presets of `samopt train` and `compare`; `samopt glue` starts from the "
        "BERT fine-tuning defaults",
    }
}
_GLUE_CHOICES = {"task": tuple(TASKS)}
_GLUE_HELP = {
    "data_dir": "the task's folder, holding train.tsv and the dev file(s) in the GLUE layout",
    "download": "fetch the task's files from GLUE's distribution point into --data-dir if missing, each checked "
    "against its SHA-256 sum",
    "model": "all-MiniLM-L6-v2 (packaged, offline) or any local or Hugging Face hub path",
    "max_length": "tokens per example (longer pairs are truncated)",
    "train_subset": "fine-tune on the first N examples of a fixed shuffle of train.tsv",
    "out": "output directory (default runs/glue-<task>-<optimizer>-s<seed>)",
}
_HELP = {
    "dataset": "data set",
    "data_dir": "directory holding the data set's files (Fashion-MNIST: Debian's location by default)",
    "download": "download Fashion-MNIST or CIFAR into --data-dir if missing",
    "train_subset": "train on the first N images of a fixed shuffle of the training set",
    "test_subset": "evaluate on the first N images of a fixed shuffle of the test set (faster; the same for every run)",
    "adaptive": "the SAM family: scale the perturbation element-wise by |w| + --eta, as ASAM (Kwon et al., ICML "
    "2021; asam always does); its rho is on ASAM's scale, about ten times SAM's",
    "base": "base optimizer of the SAM family: any torch.optim class name (sgd, adamw, ...)",
    "rho": "perturbation radius (default 0.05, on GLUE 0.005; 0.5 and 0.05 for asam and sam-on; 3 for msam, which "
    "needs it on GLUE; see `samopt optimizers`)",
    "mask_interval": "epochs between mask updates (ssam-f, ssam-d)",
    "num_samples": "examples in SSAM-F's Fisher estimate",
    "estimator": "delta-sam's per-example norm estimator (probe runs only with --amp none)",
    "bn": "the SAM family's BatchNorm statistics: updated in the first pass only, or in both",
    "granularity": "ssam-f, ssam-d, random-mask: mask single weights or whole tensors",
    "fisher_labels": "ssam-f: the Fisher's labels, the data's (empirical Fisher, the paper's) or drawn from the model",
    "drop": "ssam-d: the score that drops weights from the mask",
    "grow": "ssam-d: the score that grows weights into the mask",
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
    "gsam_alpha": "gsam: the weight of the clean gradient's part orthogonal to SAM's (0.2: the official example)",
    "rho_min": "gsam: rho at the end of the lr schedule, rho following the lr from --rho (none: constant rho)",
    "fsam_sigma": "friendly-sam: the weight of the EMA of past gradients subtracted from the ascent (1 in the paper)",
    "fsam_lambda": "friendly-sam: the factor of that EMA, in [0, 1)",
    "vasso_theta": "vasso: the weight of the new gradient in the ascent's EMA, in (0, 1] (1 is SAM)",
    "wsam_gamma": "wsam: the sharpness weight gamma in [0, 1), alpha = gamma / (1 - gamma)",
    "wsam_coupled": "wsam: add the sharpness term to the gradient (gamma 0.5 is SAM) instead of its own step",
    "ascent_sub_batches": "the SAM family's ascent gradient from the first 1/M of each batch, the update from all "
    "of it "
    "(Bahri et al., ACL 2022: about 1.25x the base cost at M = 4)",
    "label_noise": "fraction of the training labels replaced, in [0, 1) (the test set stays clean)",
    "label_noise_mode": "symmetric (another class, uniformly) or pairflip (class c to c + 1)",
    "label_noise_seed": "seed of the noise: which labels change, and into what (not the run's seed)",
}


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            return None if text.lower() == "none" else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or none, got {text!r}") from None

    return parse


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (60,120,160), got {text!r}") from None


def _did_you_mean(word: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are two lines: the problem, with the allowed values and a "did you mean"
    for a mistyped name or flag, and where the flags are listed; no usage text. A flag is never matched by a
    prefix (``--optimizer`` must not pass for ``compare``'s ``--optimizers``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})
        self.absent: dict[str, str] = {}  # flags of other commands that this one refuses, and why

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            names = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {value!r} (choose from {', '.join(names)}){_did_you_mean(str(value), names)}",
            )

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee `{self.prog} --help` for every flag and its values\n")

    def unknown_flags(self, extras: list[str]) -> typing.NoReturn:
        """Refuse ``extras``, arguments of this (sub)command's line that none of its flags took."""
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        first = next((e.split("=")[0] for e in extras if e.startswith("-")), extras[0])
        plural = "s" if len(extras) > 1 else ""
        hint = f" ({self.absent[first]})" if first in self.absent else _did_you_mean(first, flags)
        self.error(f"unrecognized argument{plural}: {' '.join(extras)}{hint}")


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def config_args(parser: argparse.ArgumentParser, kind: type[RunConfig] = TrainConfig, several: bool = False) -> None:
    """Add one flag per field of ``kind``, defaulting to "not given" so that recipes can fill them in; each help
    shows the default (``kind``'s, before any recipe) and the allowed values. ``several``: a command that runs
    several optimizers (``--optimizers``), which has no ``--optimizer``."""
    group = parser.add_argument_group("run settings" + (" (override the recipe)" if kind is TrainConfig else ""))
    if kind is TrainConfig:
        group.add_argument(
            "--recipe", choices=tuple(RECIPES), metavar="NAME", help="preset to start from (see `samopt recipes`)"
        )
    hints = typing.get_type_hints(kind)
    glue = kind is GlueConfig
    choices = {**_CHOICES, **(_GLUE_CHOICES if glue else _IMAGE_CHOICES)}
    helps = {**_HELP, **(_GLUE_HELP if glue else {})}
    hidden = {**_NO_FLAG.get(kind, {}), **({"optimizer": "this command runs several: --optimizers"} if several else {})}
    if isinstance(parser, Parser):
        parser.absent.update({flag(k): why for k, why in {**hidden, **_NOT_HERE.get(kind, {})}.items()})
    for f in dataclasses.fields(kind):
        if f.name in hidden:
            continue
        hint = hints[f.name]
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
        factory = cast(Callable[[], Any], f.default_factory)
        default = f.default if f.default is not dataclasses.MISSING else factory()
        if kw["help"] is None:
            kw["help"] = f"default {_shown(default)}"
        elif "default" not in kw["help"]:
            kw["help"] += f" (default {_shown(default)})"
        group.add_argument(flag(f.name), **kw)


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
        if s.sam_family:
            rho += f" (on GLUE {s.glue_rho})" if s.glue_rho is not None else " (on GLUE: give --rho)"
        own = f"; by default {' '.join(to_flags(s.settings))}" if s.settings else ""
        print(f"{name:<{width}}  {s.summary} ({s.citation}{rho}{own}; tasks: {', '.join(s.tasks)})")
    print("\n--ascend: which steps of the SAM family (but delta-sam) run the perturbed pass; the others cost one pass")
    for name, (summary, citation, advice) in ASCEND_POLICIES.items():
        print(f"{name:<{width}}  {summary} ({citation}){'; ' + advice if advice else ''}")


_SHARPNESS_HELP = {
    "examples": "training examples measured (the first of the run's first epoch)",
    "m": "batch size of every measure (the m of m-sharpness)",
    "bn": "BatchNorm with batch statistics (train) or running ones (eval); default train, eval for GLUE runs",
    "top_k": "eigenvalues",
    "tol": "relative tolerance of the power iteration",
    "max_iter": "most power iterations per eigenvalue",
    "probes": "HVPs of the trace estimate",
    "trace_estimator": "hutchinson, or hutch++ (probes a multiple of 3)",
    "rho": "radius of m-sharpness, relative to |w|",
    "norm": "ball of m-sharpness",
    "steps": "ascent steps of m-sharpness per batch",
    "sigma": "noise scale of average sharpness, relative to |w|",
    "samples": "noise draws per batch of average sharpness",
    "seed": "seed of the random vectors and directions",
    "device": "auto, cpu, cuda or cuda:N",
    "autocast": "forward passes under torch.autocast in bf16, or none",
}


def sharpness_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Flags for :class:`samopt.train.sharpness.Settings` (``prefix``: e.g. ``sharpness-`` beside run flags)."""
    group = parser.add_argument_group("sharpness settings")
    for f in dataclasses.fields(Settings):
        if f.name in ("measures", "progress"):
            continue
        kind = str if f.name in ("bn", "norm", "device", "autocast", "trace_estimator") else type(f.default)
        choices = {
            "bn": ("train", "eval"),
            "norm": ("l2", "linf"),
            "autocast": ("none", "bf16"),
            "trace_estimator": ("hutchinson", "hutch++"),
        }.get(f.name)
        metavar = None if choices else f.name.upper()
        group.add_argument(
            "--" + prefix + f.name.replace("_", "-"),
            dest="sharpness_" + f.name,
            type=kind,
            choices=choices,
            default=argparse.SUPPRESS,  # Settings' own default; compare must see which were given
            metavar=metavar,
            help=f"{_SHARPNESS_HELP[f.name]} (default {f.default})",
        )


def settings_from(args: argparse.Namespace, measures: str, prefix: str = "") -> Settings:
    """The :class:`Settings` of the flags :func:`sharpness_args` added with ``prefix``, measuring ``measures``
    (comma-separated); a refused setting is named by its flag as the command spells it (``--sharpness-rho`` under
    compare, whose ``--sharpness`` gives the measures)."""
    values = {k.removeprefix("sharpness_"): v for k, v in vars(args).items() if k.startswith("sharpness_")}
    try:
        return Settings(measures=tuple(measures.split(",")), **values)
    except ValueError as e:
        if not prefix:
            raise

        def prefixed(m: re.Match[str]) -> str:
            return "--" + (prefix.rstrip("-") if m[1] == "measures" else prefix + m[1])

        raise ValueError(re.sub(r"--([a-z][a-z-]*)", prefixed, str(e))) from None


def _sharpness(args: argparse.Namespace) -> None:
    if args.measures == "none" and args.landscape is None and args.interpolate is None:
        raise ValueError("--measures none with neither --landscape nor --interpolate: there is nothing to do")
    measures = "eigenvalue" if args.measures == "none" else args.measures  # the settings still need checking
    settings = dataclasses.replace(settings_from(args, measures), progress=not args.no_progress)
    for run_dir in map(Path, args.run_dirs):
        if args.landscape is not None:
            dims = int(args.landscape[0])
            path = run_landscape(run_dir, settings, dims, args.landscape_span, args.landscape_points)
            print(f"{run_dir}: {args.landscape} landscape in {path} (and {path.with_suffix('.json')})")
        if args.interpolate is not None:
            path = interpolate_runs(run_dir, Path(args.interpolate), settings)
            print(f"{run_dir}: the line to {args.interpolate} in {path} (and {path.with_suffix('.json')})")
        if args.measures == "none":
            continue
        results = measure(run_dir, settings)
        shown = []
        for name, r in results.items():
            spread = f" ± {r['stderr']:.3g}" if r.get("stderr") is not None else ""
            shown.append(f"{name} {r['value']:.4g}{spread} ({r['seconds']:.0f} s)")
        print(f"{run_dir}: {'; '.join(shown)}; written into {run_dir / 'summary.json'}")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line ``argv`` parsed; an unknown flag is refused by its subcommand, with a suggestion."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        cast(Parser, commands.choices[args.command]).unknown_flags(extras)
    return args


#: The usage line of the commands with many flags: their --help lists them by group, with defaults and values.
_USAGE = "%(prog)s [flags]"


_DRY_RUN = "print the resolved settings and the plan (loads the data and builds the model), and stop"


def build_parser() -> Parser:
    parser = Parser(prog="samopt", description="Sharpness-aware training from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="one training run", description="Train one model with one optimizer.", usage=_USAGE
    )
    config_args(train)
    train.add_argument("--dry-run", action="store_true", help=_DRY_RUN)
    compare = sub.add_parser(
        "compare",
        usage=_USAGE,
        help="several optimizers x seeds, then a table and plots",
        description="Run `samopt train` for each optimizer and seed (skipping finished runs, resuming "
        "interrupted ones), then write compare.md, compare.json and PNG plots into --out.",
    )
    compare.add_argument("--optimizers", default="sgd,sam,ssam-f,ssam-d,delta-sam", help="comma-separated names")
    compare.add_argument("--seeds", type=int, default=1, help="number of seeds: seed, seed+1, ...")
    compare.add_argument(
        "--sharpness",
        default=None,
        metavar="MEASURES",
        help=f"also measure these ({', '.join(MEASURES)}): "
        "columns in the table and landscape.png, the loss along a random direction through each solution",
    )
    sharpness_args(compare, "sharpness-")
    config_args(compare, several=True)
    glue = sub.add_parser(
        "glue",
        usage=_USAGE,
        help="fine-tune a pretrained transformer on a GLUE task",
        description="Fine-tune a Hugging Face sequence classifier on one GLUE task and report its official "
        "dev metrics each epoch (needs `pip install 'samopt[glue]'`).",
    )
    config_args(glue, GlueConfig)
    glue.add_argument("--dry-run", action="store_true", help=_DRY_RUN)
    glue_compare = sub.add_parser(
        "glue-compare",
        usage=_USAGE,
        help="several optimizers x seeds on a GLUE task, then a table and plots",
        description="`samopt compare` for `samopt glue` runs.",
    )
    glue_compare.add_argument("--optimizers", default="adamw,sam,ssam-f,delta-sam", help="comma-separated names")
    glue_compare.add_argument("--seeds", type=int, default=1, help="number of seeds: seed, seed+1, ...")
    glue_compare.add_argument("--sharpness", default=None, metavar="MEASURES", help="as in samopt compare")
    sharpness_args(glue_compare, "sharpness-")
    config_args(glue_compare, GlueConfig, several=True)
    sharp = sub.add_parser(
        "sharpness",
        help="measure the sharpness of finished runs",
        description="Measure the Hessian's top eigenvalue and trace, worst-case adaptive m-sharpness or average "
        "sharpness of each run's final weights on its training loss, and write them into its summary.json. "
        "Measures: " + "; ".join(f"{k}: {v}" for k, v in MEASURES.items()) + ".",
    )
    sharp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the --out folder of a finished run")
    sharp.add_argument("--measures", default="eigenvalue,trace,m-sharpness", help="comma-separated names, or none")
    sharp.add_argument(
        "--landscape",
        choices=("1d", "2d"),
        default=None,
        help="also the loss around the solution along one or two "
        "random filter-normalised directions: landscape-1d/2d.png (a contour plot in 2d) and .json in RUN_DIR",
    )
    sharp.add_argument("--landscape-span", type=float, default=1.0, help="coordinates from -span to span")
    sharp.add_argument("--landscape-points", type=int, default=21, help="grid points per direction")
    sharp.add_argument(
        "--interpolate",
        default=None,
        metavar="OTHER_RUN_DIR",
        help="also the loss on the line from the run's "
        "solution to OTHER_RUN_DIR's (same model): line-to-<name>.png and .json in RUN_DIR",
    )
    sharp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sharpness_args(sharp)
    sub.add_parser("recipes", help="list the presets of --recipe")
    sub.add_parser("optimizers", help="list the optimizers and --ascend policies, with their papers and settings")
    return parser


def as_flags(message: str, kind: type[RunConfig]) -> str:
    """``message`` with the settings it names as fields of ``kind`` (``batch_size``, the name a config or a Python
    caller uses) named by their flags (``--batch-size``), as the command line's user types them.

    A name in quotes (a value, such as ``'last_scores'``), in a path or already a flag is left as it is; a name
    without an underscore is a flag only where it opens the message (``rho must be ...``), not in prose. The
    allowed ``None`` becomes ``none``, the word the command line takes for it (``--max-grad-norm none``)."""
    fields = {f.name for f in dataclasses.fields(kind)}

    def renamed(m: re.Match[str]) -> str:
        return flag(m[0]) if m[0] in fields else m[0]

    message = message.replace(" must be None or ", " must be none or ")
    message = re.sub(r"(?<![-\w.'\"/])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![-\w'\"/])", renamed, message)
    return re.sub(r"^[a-z][a-z0-9]*(?= must | and )", renamed, message)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.command in ("recipes", "optimizers"):
        (_recipes if args.command == "recipes" else _optimizers)()
        return 0
    if args.command == "sharpness":
        try:
            _sharpness(args)
        except (ValueError, ImportError, OSError, FloatingPointError, RuntimeError) as e:
            print(f"samopt sharpness: error: {e}", file=sys.stderr)
            return 2
        return 0
    kind = GlueConfig if args.command.startswith("glue") else TrainConfig
    recipe = getattr(args, "recipe", None)
    try:
        if args.command.endswith("compare") and os.environ.get("WORLD_SIZE", "1") != "1":
            raise ValueError(
                "compare runs its runs one after another in one process; under torchrun, launch each "
                "`samopt train` / `samopt glue` run with torchrun instead"
            )
        if args.command in ("train", "glue") and args.dry_run:
            cfg = resolve(recipe, _explicit(args, kind), kind)
            print(f"samopt {args.command} {' '.join(to_flags(dataclasses.asdict(cfg)))}")
            dry_run(cfg)
        elif args.command in ("train", "glue"):
            summary = run(resolve(recipe, _explicit(args, kind), kind))
            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
                print(
                    f"final {summary['score']} {100 * summary['final_score']:.2f} (best "
                    f"{100 * summary['best_score']:.2f}), {summary['seconds_per_epoch']:.1f} s/epoch; "
                    f"results in {summary['out']}"
                )
        else:
            command = "glue" if kind is GlueConfig else "train"
            given = [k.removeprefix("sharpness_").replace("_", "-") for k in vars(args) if k.startswith("sharpness_")]
            if args.sharpness is None and given:
                raise ValueError(
                    f"{', '.join('--sharpness-' + g for g in given)} set how sharpness is measured, but nothing is "
                    "measured without --sharpness MEASURES (e.g. --sharpness eigenvalue,trace)"
                )
            sharpness = None if args.sharpness is None else settings_from(args, args.sharpness, "sharpness-")
            compare(recipe, _explicit(args, kind), args.optimizers.split(","), args.seeds, command, sharpness)
    except (ValueError, CheckpointError, DirectoryInUseError, ImportError, OSError, FloatingPointError) as e:
        print(f"samopt {args.command}: error: {as_flags(str(e), kind)}", file=sys.stderr)
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
