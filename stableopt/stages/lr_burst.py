"""LRBurst: hold back a scheduled LR that jumps far above every LR the run has trained with.

An Adam-family update is the LR times a bounded direction, so a schedule that multiplies
the LR by 100 for a stretch (a bug in a hand-written schedule, a wrong unit, a restored
scheduler state of another run) makes every update of the stretch about 100 times the run's
usual size relative to the weights: the damage lands with the first of them, before the loss
or the gradient norm can show it. The scheduled LR is known before the update, so the burst
can be caught there.

Before each update the scheduled LR of every parameter group is compared with the largest
LR that group has trained with so far (the LR actually used: the scheduled one times the
factor). Once the schedule has come down from its peak (a scheduled LR below the one before
it, after ``min_steps`` steps: the warm-up is over, however it was shaped, a constant first
epoch included), an LR more than ``ratio`` times that is held at it (the
policy's factor scales it back) for up to ``hold_fraction`` of the steps run so far (at
least ``min_hold``); if the schedule is still that high after the hold, the jump is taken as
the schedule's intent (a constant warm-up followed by the real LR, a deliberate restart at a
higher LR) and the LR is let up by at most 2x a step until it is within ``ratio`` of what
the run has used. Schedules that never exceed their earlier LRs by ``ratio`` once they decay
(warm-up of any shape, cosine, step decay, SGDR warm restarts that return to the first peak,
one-cycle, cyclic) are never touched; a constant LR is never judged (a burst in a run that
never decays is not caught).

Opt-in: ``SafeOptimizer(inner, lr_policies=[LRBurst()])``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt.outcomes import Cause, EventKind
from stableopt.stages.base import StepNumbers
from stableopt.stages.lr_factor import LRChange

__all__ = ["LRBurst"]


class LRBurst:
    """Hold back an LR far above every LR the run has used (see the module docstring).

    An ``lr_cut`` event (``Cause.POLICY``, ``labels["policy"] == "lr_burst"``, the excess
    in its data) where a hold starts, an ``lr_recovery`` where the factor is back at 1.

    Args:
        ratio: how far above the largest LR used so far (per group) counts as a burst.
        min_steps: steps before anything is judged (a warm-up's first jumps).
        hold_fraction: the longest hold, as a fraction of the steps run so far.
        min_hold: the longest hold is at least this many steps.
    """

    name = "lr_burst"

    def __init__(
        self,
        ratio: float = 4.0,
        min_steps: int = 20,
        hold_fraction: float = 0.2,
        min_hold: int = 10,
    ) -> None:
        self.ratio = check_float("ratio", ratio, minimum=1.0, inclusive_min=False)
        self.min_steps = check_int("min_steps", min_steps, minimum=0)
        self.hold_fraction = check_float("hold_fraction", hold_fraction, minimum=0.0)
        self.min_hold = check_int("min_hold", min_hold, minimum=0)
        #: the multiplier on the scheduled LR now (1.0: none)
        self.factor = 1.0
        #: the effective LR is never below this (unless the schedule is)
        self.min_lr = 0.0
        self.steps = 0
        self.held = 0  # steps held in the current burst
        self.letting_up = False  # the hold ran out: the jump is the schedule's
        self.used: list[float] = []  # the largest LR each group has trained with
        self.previous: list[float] = []  # the scheduled LRs of the step before
        self.decayed = False  # the schedule has come down once after min_steps

    def before_update(self, scheduled: Sequence[float]) -> LRChange | None:
        """Set the factor for the coming update from the groups' scheduled LRs; the change."""
        old = self.factor
        lrs = [float(lr) for lr in scheduled]
        if len(lrs) != len(self.used):  # a group added: its history starts now
            self.used = (self.used + lrs)[: len(lrs)]
            self.previous = (self.previous + lrs)[: len(lrs)]
        self.steps += 1
        if self.steps > self.min_steps and any(
            lr < before for lr, before in zip(lrs, self.previous)
        ):
            self.decayed = True
        self.previous = lrs
        excess = max(
            (lr / used for lr, used in zip(lrs, self.used) if used > 0 and math.isfinite(lr)),
            default=1.0,
        )
        if not self.decayed or excess <= self.ratio:
            self.factor, self.held, self.letting_up = 1.0, 0, False
        elif self.letting_up or self.held >= max(self.min_hold, self.hold_fraction * self.steps):
            self.letting_up = True
            self.factor = min(1.0, 2.0 / excess)  # up by at most 2x a step
        else:
            self.held += 1
            self.factor = 1.0 / excess  # the largest LR used so far
        self.used = [max(used, lr * self.factor) for used, lr in zip(self.used, lrs)]
        if (self.factor < 1.0) == (old < 1.0):  # told where a hold starts and where it ends
            return None
        kind = EventKind.LR_CUT if self.factor < old else EventKind.LR_RECOVERY
        data = {"excess": excess, "held": float(self.held)}
        return LRChange(kind, Cause.POLICY, old, self.factor, data, {"policy": self.name})

    def observe(self, numbers: StepNumbers) -> None:
        """Nothing: the policy decides before the update (:meth:`before_update`)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "steps": self.steps,
            "held": self.held,
            "letting_up": self.letting_up,
            "used": list(self.used),
            "previous": list(self.previous),
            "decayed": self.decayed,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.factor = float(state_dict["factor"])
        self.steps = int(state_dict["steps"])
        self.held = int(state_dict["held"])
        self.letting_up = bool(state_dict["letting_up"])
        self.used = [float(x) for x in state_dict["used"]]
        self.previous = [float(x) for x in state_dict.get("previous", self.used)]
        self.decayed = bool(state_dict.get("decayed", True))

    def __repr__(self) -> str:
        return (
            f"LRBurst(ratio={self.ratio:g}, min_steps={self.min_steps}, "
            f"hold_fraction={self.hold_fraction:g}, min_hold={self.min_hold})"
        )
