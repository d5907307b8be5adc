"""The LR factor: the product of every LR policy's multiplier, and its bounds.

The built-in policies (:class:`~stableopt.stages.emergency_lr.EmergencyLR`,
:class:`~stableopt.stages.hot_lr.HotLR`, :class:`~stableopt.stages.plateau.PlateauLR`) move
their factors when the response tells them what a step led to; the policies of
``SafeOptimizer(lr_policies=[...])`` (:class:`~stableopt.roles.LRPolicy`) move theirs
in ``observe``. Here the factors are combined, applied around the update as a multiplier
(:mod:`stableopt.stages.lr_factor`: never a write into the schedule) and a user policy's
change is reported as data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from stableopt.outcomes import Cause, EventKind
from stableopt.roles import EmergencyLRRole, HotLRRole, LRPolicy, PlateauRole
from stableopt.stages.base import StepNumbers
from stableopt.stages.emergency_lr import Trigger
from stableopt.stages.lr_factor import LRChange, effective_lr
from stableopt.verdict import StepVerdict

__all__ = ["LRControl"]


class LRControl:
    """Combine the LR policies' factors (see the module docstring).

    Args:
        emergency: the emergency LR policy (``None``: off).
        hot: the hot-LR watch (``None``: off).
        plateau: the plateau policy (``None``: off); its ``max_lr`` caps the effective LR.
        extra: the policies of ``SafeOptimizer(lr_policies=[...])``.

    The factors multiply in that order: emergency, hot, plateau, then ``extra``.
    """

    def __init__(
        self,
        emergency: EmergencyLRRole | None = None,
        hot: HotLRRole | None = None,
        plateau: PlateauRole | None = None,
        extra: Sequence[LRPolicy] = (),
    ) -> None:
        builtin: list[LRPolicy | None] = [emergency, hot, plateau]
        self.policies: list[LRPolicy] = [p for p in builtin if p is not None] + list(extra)
        self.emergency, self.hot, self.plateau = emergency, hot, plateau
        self.extra = list(extra)

    @property
    def factor(self) -> float:
        """Our LR multiplier: the product of every policy's factor (1.0 = none)."""
        return math.prod(float(policy.factor) for policy in self.policies)

    def bounds(self) -> tuple[float, float | None]:
        """``(min_lr, max_lr)`` of the effective LR."""
        min_lr = max((float(policy.min_lr) for policy in self.policies), default=0.0)
        return min_lr, self.plateau.max_lr if self.plateau is not None else None

    def effective_lr(self, scheduled: Tensor | float) -> Any:
        """The LR an update with the scheduled LR ``scheduled`` uses."""
        return effective_lr(scheduled, self.factor, *self.bounds())

    def before_update(self, scheduled: list[float]) -> list[LRChange]:
        """Give the policies that decide before the update (a ``before_update`` method, as
        :class:`~stableopt.stages.lr_burst.LRBurst`) the groups' scheduled LRs; their changes."""
        changes = []
        for policy in self.extra:
            decide = getattr(policy, "before_update", None)
            if decide is not None:
                change = decide(scheduled)
                if change is not None:
                    changes.append(change)
        return changes

    def observe(self, numbers: StepNumbers) -> list[LRChange]:
        """Hand the step's numbers to the policies of ``lr_policies``; their changes."""
        changes = []
        for policy in self.extra:
            old = float(policy.factor)
            policy.observe(numbers)
            new = float(policy.factor)
            if new != old:
                kind = EventKind.LR_CUT if new < old else EventKind.LR_RECOVERY
                changes.append(LRChange(kind, Cause.POLICY, old, new, {}, {"policy": policy.name}))
        return changes

    def after_step(
        self,
        step: int,
        verdict: StepVerdict,
        *,
        is_healthy: bool,
        rolled_back: bool,
        cut: Trigger | None,
        hot_cut: bool,
    ) -> list[LRChange]:
        """Move the built-in factors after a step: the emergency policy cuts on ``cut`` (the
        reason the escalation gave, unless the hot-LR watch cut already) or an absolute
        threshold it crossed, else counts a healthy step towards recovery; the plateau test
        restarts after any intervention. Their changes, in order."""
        changes: list[LRChange | None] = []
        if self.hot is not None and rolled_back and not hot_cut:
            self.hot.restart()  # the losses it holds came from weights that are gone
        if self.emergency is not None:
            own = None if hot_cut else cut
            trigger = own
            if trigger is None and verdict.is_accepted:
                trigger = self.emergency.trigger(verdict.grad_norm, verdict.loss)
            changes.append(
                self.emergency.update(
                    step, trigger, is_healthy=is_healthy and not hot_cut, immediate=own is not None
                )
            )
        if self.plateau is not None:
            if not is_healthy or cut is not None:
                self.plateau.restart()
            changes.append(self.plateau.update())
        return [change for change in changes if change is not None]
