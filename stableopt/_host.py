"""Host-side values of a step: what the stages' histories are made of.

The pipeline reads each step's numbers (total gradient norm, loss, clip
coefficient, flags) to the host in one transfer (:func:`stableopt.stats.read_values`),
and every history (ZClip's EMA, AutoClip's window, the spike guard's windows, the
emergency cool-down, the plateau window) is updated from those Python numbers.
A history then costs a few host operations per step instead of a dozen device
kernels, and a decision on the device needs only scalars the host already
holds (a bound to compare the norm with), never a sync of its own.

Stages called directly (outside the pipeline) may still be given 0-dim tensors:
these helpers read them (one sync each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_bool", "as_float", "false_like", "from_ring", "to_ring"]


def as_float(value: Tensor | float) -> float:
    """``value`` as a Python float (reads a tensor: a sync when it lives on an accelerator)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def as_bool(value: Tensor | bool) -> bool:
    """``value`` as a Python bool (reads a tensor: a sync when it lives on an accelerator)."""
    return bool(value.detach()) if isinstance(value, Tensor) else bool(value)


_FALSE: dict[Any, Tensor] = {}


def false_like(tensor: Tensor) -> Tensor:
    """A 0-dim ``False`` on ``tensor``'s device, made once per device (never mutated)."""
    key = tensor.device
    flag = _FALSE.get(key)
    if flag is None:
        flag = _FALSE[key] = torch.zeros((), dtype=torch.bool, device=key)
    return flag


def to_ring(values: Sequence[float], count: int, size: int) -> Tensor:
    """The last ``len(values)`` of ``count`` values as a NaN-padded ring of ``size`` (CPU
    float64): value number ``i`` sits at ``i % size``. The state-dict layout of every window."""
    ring = torch.full((size,), math.nan, dtype=torch.float64)
    first = count - len(values)
    for offset, value in enumerate(values):
        ring[(first + offset) % size] = value
    return ring


def from_ring(ring: Tensor, count: int, keep: int) -> list[float]:
    """The last ``min(count, keep, len(ring))`` values of a ring written by :func:`to_ring`
    (or by the device ring buffers of older state dicts), oldest first."""
    size = len(ring)
    held = min(count, keep, size)
    values = ring.detach().cpu().double().tolist()
    return [values[i % size] for i in range(count - held, count)]
