"""Argument checks shared by samopt's optimizers: each error names the argument and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real


def nonnegative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite real number >= 0, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


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
    return value  # type: ignore[return-value]


def unit_interval(name: str, value: object, *, include_one: bool) -> float:
    """Return ``value`` as a float if it lies in [0, 1] (or [0, 1) without ``include_one``), else raise."""
    interval = "[0, 1]" if include_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r} ({type(value).__name__})")
    if not (0 <= value <= 1) or (value == 1 and not include_one):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}")
    return float(value)


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
