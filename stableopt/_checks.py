"""Argument validation shared by every stage: errors name the argument and what is accepted."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` >= ``minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    inclusive_min: bool = True,
    allow_inf: bool = False,
) -> float:
    """Return ``float(value)`` if it is a real number in range; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    accepted = _describe_range(minimum, maximum, inclusive_min)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number {accepted}, got {value!r}")
    if minimum is not None and (value < minimum or (not inclusive_min and value == minimum)):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; raise naming the accepted values."""
    options = list(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _describe_range(minimum: float | None, maximum: float | None, inclusive_min: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>=' if inclusive_min else '>'} {minimum:g}")
    if maximum is not None:
        parts.append(f"<= {maximum:g}")
    return " and ".join(parts) if parts else "(any real number)"
