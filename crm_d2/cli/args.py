"""argparse value types shared by the command-line tools: a bad value gives argparse's usage
line and ``error: argument --NAME: ...`` (exit status 2), never a traceback later on."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "float_list",
    "float_range",
    "int_list",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "probability",
]


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(text: str, kind: type, ok: Callable[[float], bool], what: str) -> float | int:
    """``text`` as a ``kind`` for which ``ok`` holds, else ``must be WHAT, got TEXT``."""
    value = _number(text, kind)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _checked(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _checked(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(text, float, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(text, float, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    """A number in [0, 1]."""
    return _checked(text, float, lambda v: 0 <= v <= 1, "in [0, 1]")


def _numbers(text: str, kind: type) -> tuple:
    return tuple(_number(v, kind) for v in text.replace(",", " ").split())


def float_list(text: str) -> tuple[float, ...]:
    """Finite numbers separated by commas or spaces: ``"0.5,1"`` -> ``(0.5, 1.0)``."""
    return _numbers(text, float)


def int_list(text: str) -> tuple[int, ...]:
    """Integers separated by commas or spaces: ``"22500,37500"`` -> ``(22500, 37500)``."""
    return _numbers(text, int)


def float_range(text: str) -> tuple[float, float]:
    """``LO,HI`` with ``0 < LO <= HI``."""
    values = _numbers(text, float)
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 < LO <= HI, got {text!r}")
    return values


#: ``--autocast`` values of the CRM commands (see :func:`crm_d2.sparse.parse_autocast`).
AUTOCAST_CHOICES = ("auto", "none", "bf16", "fp16")
