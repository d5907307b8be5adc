"""The state-dict layout of every window of host values: a NaN-padded ring of CPU float64.

A window (AutoClip's norms, the spike guard's, the plateau test's losses) lives on
the host as Python floats; its state dict holds it as a fixed-size tensor so that
a checkpoint has the same shapes at every step and loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["from_ring", "to_ring"]


def to_ring(values: Sequence[float], count: int, size: int) -> Tensor:
    """The last ``len(values)`` of ``count`` values as a NaN-padded ring of ``size`` (CPU
    float64): value number ``i`` sits at ``i % size``."""
    ring = torch.full((size,), math.nan, dtype=torch.float64)
    first = count - len(values)
    for offset, value in enumerate(values):
        ring[(first + offset) % size] = value
    return ring


def from_ring(ring: Tensor, count: int, keep: int) -> list[float]:
    """The last ``min(count, keep, len(ring))`` values of a ring written by :func:`to_ring`
    (float32 rings of older state dicts too), oldest first."""
    size = len(ring)
    held = min(count, keep, size)
    values = ring.detach().cpu().double().tolist()
    return [values[i % size] for i in range(count - held, count)]
