"""How our LR factors apply: multipliers around the inner update, never writes into the schedule.

**The composition rule.** Our LR changes are multipliers, never writes into the
user's schedule. Each policy keeps a factor (1.0 = no change); just around the
inner optimizer's update, every group's ``lr`` is replaced by
``schedule_lr * emergency_factor * plateau_factor`` (never below ``min_lr``,
unless the schedule itself is lower; never above ``max_lr``) and put back right
after. So ``group["lr"]`` as the user and the LR scheduler read and write it
between steps is always the *scheduled* LR; a cosine or warm-up schedule keeps
running underneath our cut instead of erasing it one step later.
:meth:`stableopt.SafeOptimizer.effective_lr` gives the LR actually used.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from stableopt.outcomes import AnyCause, EventKind

__all__ = ["LRChange", "effective_lr", "scaled_lr"]

_NONE: Mapping[str, Any] = MappingProxyType({})


class LRChange(NamedTuple):
    """One change of a factor, as data: what the accounting records as an event.

    Attributes:
        kind: :attr:`~stableopt.outcomes.EventKind.LR_CUT`, ``LR_RECOVERY`` or ``PLATEAU``.
        cause: why (:class:`~stableopt.outcomes.Cause`, or a failing step's
            :class:`~stableopt.outcomes.SkipReason`).
        old_factor: the factor before.
        new_factor: the factor after.
        data: the numbers behind it (a loss level, a window, a count of triggers).
        labels: names behind it (the failing step's cause, a policy's name).
    """

    kind: EventKind
    cause: AnyCause | None
    old_factor: float
    new_factor: float
    data: Mapping[str, float] = _NONE
    labels: Mapping[str, str] = _NONE


def effective_lr(scheduled: Any, factor: float, min_lr: float, max_lr: float | None) -> Any:
    """``scheduled * factor``, floored at ``min(min_lr, scheduled)`` and capped at ``max_lr``."""
    lr = scheduled * factor
    if isinstance(lr, Tensor):
        lr = torch.maximum(lr, torch.clamp(scheduled, max=min_lr)) if min_lr > 0 else lr
        return torch.clamp(lr, max=max_lr) if max_lr is not None else lr
    if min_lr > 0:
        lr = max(lr, min(min_lr, scheduled))
    return min(lr, max_lr) if max_lr is not None else lr


@contextmanager
def scaled_lr(
    param_groups: list[dict[str, Any]],
    factor: float,
    min_lr: float = 0.0,
    max_lr: float | None = None,
) -> Iterator[None]:
    """Within the block, each group's ``lr`` is the effective LR; afterwards the scheduled one.

    With ``factor == 1`` and no cap nothing is written at all, so a healthy run is
    bit-identical to the bare optimizer.
    """
    if factor == 1.0 and max_lr is None:
        yield
        return
    scheduled = [group["lr"] for group in param_groups]
    try:
        for group, lr in zip(param_groups, scheduled):
            group["lr"] = effective_lr(lr, factor, min_lr, max_lr)
        yield
    finally:
        for group, lr in zip(param_groups, scheduled):
            group["lr"] = lr
