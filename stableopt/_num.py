"""Arithmetic generic over Python floats and 0-dim tensors: one formula for host and device.

A step's decision (may the update run, how much to clip) is written once with
these helpers. Given floats (the step is decided on the host: CPU gradients, or
numbers read before the update) a formula returns floats and bools; given 0-dim
tensors (a fused inner optimizer on an accelerator takes the decision in
``found_inf`` before anything is read) it returns tensors, with no host sync.
Each helper computes the same value both ways, NaN included; ``tests/test_num.py``
drives both with the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeAlias, overload

import torch
from torch import Tensor

__all__ = ["Num", "clamp", "finite_or", "is_within", "lerp", "select", "where"]

#: A number of a decision: a Python float on the host, a 0-dim tensor on the device.
Num: TypeAlias = float | Tensor


@overload
def where(condition: bool, if_true: float, if_false: float) -> float: ...
@overload
def where(condition: Tensor | bool, if_true: Num, if_false: Num) -> Num: ...
def where(condition: Tensor | bool, if_true: Num, if_false: Num) -> Num:
    """``if_true`` where ``condition`` holds, else ``if_false`` (``torch.where`` for tensors)."""
    if isinstance(condition, Tensor):
        return torch.where(condition, if_true, if_false)
    return if_true if condition else if_false


def select(condition: Tensor | bool, if_true: Callable[[], Num], if_false: Num) -> Num:
    """:func:`where` whose first branch is computed only when it can be chosen.

    On the host only the chosen branch is evaluated (a formula that divides by
    zero away from its own case never runs); on the device both are, and
    ``torch.where`` keeps the chosen one.
    """
    if isinstance(condition, Tensor):
        return torch.where(condition, if_true(), if_false)
    return if_true() if condition else if_false


def clamp(value: Num, low: float | None = None, high: float | None = None) -> Num:
    """``value`` limited to ``[low, high]`` (either may be ``None``); NaN stays NaN."""
    if isinstance(value, Tensor):
        return value if low is None and high is None else value.clamp(min=low, max=high)
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    return value


def finite_or(value: Num, fallback: float) -> Num:
    """``value`` where it is finite, else ``fallback`` (NaN and both infinities)."""
    if isinstance(value, Tensor):
        return torch.nan_to_num(value, nan=fallback, posinf=fallback, neginf=fallback)
    return value if math.isfinite(value) else fallback


def is_within(value: Num, low: float, high: float) -> Tensor | bool:
    """``low <= value <= high``; false for NaN (two kernels on the device: a clamp and a compare)."""
    if isinstance(value, Tensor):
        return value.clamp(min=low, max=high) == value
    return low <= value <= high


def lerp(start: Num, end: Num, weight: float) -> Num:
    """``torch.lerp``: ``start + weight (end - start)``, computed from the nearer end, as
    torch (and ``numpy.percentile``) do, so both ways round alike."""
    if isinstance(start, Tensor) or isinstance(end, Tensor):
        start = torch.as_tensor(start)
        return torch.lerp(start, torch.as_tensor(end, dtype=start.dtype), weight)
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)
