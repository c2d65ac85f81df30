"""Argument checks shared by samopt's optimizers: each error names the argument and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Literal, cast, overload

import torch


def nonnegative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite real number >= 0, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


def rate(name: str, value: object, params: Iterable[torch.Tensor]) -> None:
    """Raise unless ``value`` (a learning rate or weight decay: a number or a one-element tensor) is finite,
    >= 0 and within the range of the dtype of ``params``, which it multiplies.

    A tensor on an accelerator is not read (that would wait for the device).
    """
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {value.shape}")
        if value.device.type != "cpu":
            return
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or float(value) < 0:
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    dtypes = {p.dtype for p in params if p.is_floating_point() or p.is_complex()}
    for dtype in dtypes:
        top = torch.finfo(dtype).max
        if float(value) > top:
            raise ValueError(f"{name} must be at most {top:.4g} (the largest {dtype} of its parameters), got {value!r}")


def finite(name: str, value: object, allowed: str = "a finite real number") -> float:
    """Return ``value`` as a float if it is a finite real number, else raise (``allowed`` describes it)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def positive_or_none(name: str, value: object) -> float | None:
    """Return ``value`` as a float if it is None or a finite real number > 0, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be None or a finite real number > 0, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be None or a finite real number > 0, got {value!r}")
    return float(value)


def boolean(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def choice(name: str, value: object, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming them all."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return cast(str, value)


def unit_interval(name: str, value: object, *, include_one: bool) -> float:
    """Return ``value`` as a float if it lies in [0, 1] (or [0, 1) without ``include_one``), else raise."""
    interval = "[0, 1]" if include_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r} ({type(value).__name__})")
    if not (0 <= float(value) <= 1) or (value == 1 and not include_one):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}")
    return float(value)


@overload
def positive_int(name: str, value: object, *, allow_none: Literal[False] = False) -> int: ...


@overload
def positive_int(name: str, value: object, *, allow_none: bool) -> int | None: ...


def positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an int >= 1 (or None when ``allow_none``), else raise."""
    what = f"{'None or ' if allow_none else ''}an integer >= 1"
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def seed_or_none(name: str, value: object) -> int | None:
    """Return ``value`` if it is None or an int (a random seed), else raise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be None or an int, got {value!r}")
    return value


def optimizer_state(optimizer: torch.optim.Optimizer, state_dict: object) -> None:
    """Raise ``ValueError`` unless ``state_dict`` (torch.optim's format) can be loaded into ``optimizer``.

    Checked, before anything is loaded: the number of groups and of parameters in
    each; that each saved group has every hyperparameter ``optimizer`` needs (after
    the defaults its ``__setstate__`` fills in for states of older torch versions),
    so another optimizer's state (SGD's into AdamW) is refused; and that each saved
    per-parameter tensor fits its parameter (a scalar, or as many dimensions as the
    parameter and a shape that broadcasts to it: its own, or factored second moments), with the keys of
    the state ``optimizer`` already holds for it, if any.
    """
    if (
        not isinstance(state_dict, dict)
        or not isinstance(state_dict.get("state"), dict)
        or not isinstance(state_dict.get("param_groups"), list)
    ):
        raise ValueError("not an optimizer state_dict: it needs 'state' (a dict) and 'param_groups' (a list)")
    groups, saved = optimizer.param_groups, state_dict["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(f"the state_dict has {len(saved)} parameter group(s), this optimizer {len(groups)}")
    for i, (group, old) in enumerate(zip(groups, saved, strict=True)):
        if not isinstance(old, dict) or not isinstance(old.get("params"), list):
            raise ValueError(f"param_groups[{i}] of the state_dict is not a parameter group (a dict with 'params')")
        if len(old["params"]) != len(group["params"]):
            raise ValueError(
                f"param_groups[{i}] holds {len(old['params'])} parameter(s) in the state_dict and "
                f"{len(group['params'])} in this optimizer: it was saved from another model or grouping"
            )
    probe = object.__new__(type(optimizer))  # what the optimizer's own __setstate__ makes of the saved groups
    try:
        probe.__setstate__(
            {
                "state": {},
                "defaults": dict(optimizer.defaults),
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in saved],
            }
        )
    except Exception as e:
        raise ValueError(f"{type(optimizer).__name__} cannot read the state_dict's parameter groups ({e})") from None
    for i, (group, filled) in enumerate(zip(groups, probe.param_groups, strict=True)):
        missing = sorted(set(group) - set(filled) - {"params", "param_names"})
        if missing:
            raise ValueError(
                f"param_groups[{i}] of the state_dict has no {missing}, which {type(optimizer).__name__} needs: "
                "it was saved by another kind of optimizer"
            )
    where = {
        pid: (i, j, p)
        for i, (group, old) in enumerate(zip(groups, saved, strict=True))
        for j, (pid, p) in enumerate(zip(old["params"], group["params"], strict=True))
    }
    for pid, values in state_dict["state"].items():
        if pid not in where or not isinstance(values, dict):
            raise ValueError(f"the state_dict's state for parameter {pid!r} belongs to no parameter group")
        i, j, p = where[pid]
        current = optimizer.state.get(p)
        if current and set(current) != set(values):
            raise ValueError(
                f"the state of param_groups[{i}] parameter {j} has keys {sorted(values)}, this optimizer's "
                f"{sorted(current)}: it was saved by another kind of optimizer"
            )
        for key, value in values.items():
            if (
                torch.is_tensor(value)
                and value.dim()
                and (value.dim() != p.dim() or not _broadcasts(value.shape, p.shape))
            ):
                raise ValueError(
                    f"the state {key!r} of param_groups[{i}] parameter {j} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(p.shape)}: it was saved from another model"
                )


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False
