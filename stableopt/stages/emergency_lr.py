"""Emergency LR: cut the learning rate when training blows up, recover it gradually.

Decided on the host from numbers the step has already read (no extra sync); the
factor applies as a multiplier around the update (:mod:`stableopt.stages.lr_factor`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from stableopt._checks import check_float, check_int
from stableopt.outcomes import AnyCause, Cause, EventKind
from stableopt.stages.base import StepNumbers
from stableopt.stages.lr_factor import LRChange

__all__ = ["EmergencyLR", "Trigger"]


class Trigger(NamedTuple):
    """Why :meth:`EmergencyLR.update` is asked to cut: a cause and the numbers behind it."""

    cause: AnyCause
    data: Mapping[str, float]
    labels: Mapping[str, str] = {}


class EmergencyLR:
    """Cut the LR when an accepted update made things worse; bring it back gradually.

    What cuts (decided by the escalation, :class:`~stableopt.escalation.Escalation`, and
    passed to :meth:`update` with ``immediate=True``): a run of failed steps long enough
    that the state itself is failing, and an update that wrote non-finite weights when it
    is the ``weight_faults``-th within ``trigger_window`` steps (:meth:`weight_fault`);
    each comes with a rollback. One corrupting update alone is restored and not cut: it
    says the numerics of that update failed (silent data corruption, an unlucky ``eps``),
    not that the LR is wrong; the same fault again soon after does. A bad *input* (a NaN
    or Inf loss or gradient, a spike) is skipped and has touched nothing: it never cuts
    the LR, however often it recurs.

    Optional absolute triggers (off by default: a constant means nothing to a run whose
    healthy norm is 1e-3 or 1e5): a total gradient norm above ``grad_norm_threshold`` or
    a loss above ``loss_threshold``. Those cut when they repeat: the ``min_triggers``-th
    within ``trigger_window`` steps, or any while the LR is already cut. A trigger
    within ``cooldown_steps`` of the last cut does not cut again (one burst, one cut).

    Recovery: after ``recovery_after_steps`` consecutive healthy steps the factor
    is multiplied by ``recovery_growth`` every ``recovery_every_steps`` healthy
    steps until it is back at 1: a geometric ramp, 0.1 -> 0.2 -> 0.4 -> 0.8 -> 1
    over 20 + 3 x 5 = 35 healthy steps with the defaults. A healthy step is an
    accepted step without a trigger; a failed step restarts the count. In formulas,
    with one cut to ``c`` at step ``k`` and only healthy steps after it, the factor
    in force at step ``k + 1 + h`` (``h`` healthy steps done) is
    ``min(1, c * g**j)`` with ``j = 0`` for ``h < a`` and ``j = 1 + (h - a) // e``
    otherwise (``a``, ``e``, ``g``: ``recovery_after_steps``,
    ``recovery_every_steps``, ``recovery_growth``).

    Bounded: within one emergency (from a cut at factor 1 until the factor is back at
    1) the cuts compound at most ``max_cuts`` times; a further trigger is recorded but
    leaves the factor where it is, rather than shrinking the LR to nothing. Stopping a
    run that cannot make progress is the escalation's (``DivergenceError``), never this
    policy's: faults separated by recovered, healthy stretches never add up.

    Args:
        factor: multiplier per cut (default 0.1, in (0, 1)).
        grad_norm_threshold: an absolute total norm that triggers a cut (default
            ``None``: off; ``> 0``).
        loss_threshold: an absolute loss that triggers a cut (default ``None``: off; ``> 0``).
        min_lr: the effective LR is never cut below this (default 0.0, ``>= 0``).
        cooldown_steps: steps after a cut during which triggers do not cut again
            (default 10, ``>= 0``).
        recovery_after_steps: healthy steps before recovery starts (default 20, ``>= 1``).
        recovery_every_steps: healthy steps between recovery increments (default 5, ``>= 1``).
        recovery_growth: factor multiplier per increment (default 2.0, ``> 1``).
        max_cuts: cuts that compound within one emergency (default 4, ``>= 1``: the
            factor never goes below ``factor ** max_cuts``, 1e-4 with the defaults).
        min_triggers: absolute-threshold triggers within ``trigger_window`` steps that
            make a cut, outside an emergency (default 3, ``>= 1``).
        trigger_window: steps over which triggers are counted (default 20, ``>= 1``).
        weight_faults: updates that wrote non-finite weights within ``trigger_window``
            steps that make a cut (default 2, ``>= 1``; 1: the first cuts at once). On the
            stability benchmark's ``nan_weights`` scenario (a NaN written into one weight
            on 1% of steps, 300 steps) a cut at each fault left the MLP 1.11x worse than
            fault-free; with 2 it ends at 0.999x.
    """

    name = "emergency_lr"

    def __init__(
        self,
        factor: float = 0.1,
        grad_norm_threshold: float | None = None,
        loss_threshold: float | None = None,
        min_lr: float = 0.0,
        cooldown_steps: int = 10,
        recovery_after_steps: int = 20,
        recovery_every_steps: int = 5,
        recovery_growth: float = 2.0,
        max_cuts: int = 4,
        min_triggers: int = 3,
        trigger_window: int = 20,
        weight_faults: int = 2,
    ) -> None:
        self.cut_factor = check_float(
            "factor", factor, minimum=0.0, maximum=1.0, inclusive_min=False
        )
        if self.cut_factor == 1.0:
            raise ValueError("factor must be < 1 (a cut), got 1.0")
        self.grad_norm_threshold = _optional_threshold("grad_norm_threshold", grad_norm_threshold)
        self.loss_threshold = _optional_threshold("loss_threshold", loss_threshold)
        self.min_lr = check_float("min_lr", min_lr, minimum=0.0)
        self.cooldown_steps = check_int("cooldown_steps", cooldown_steps, minimum=0)
        self.recovery_after_steps = check_int(
            "recovery_after_steps", recovery_after_steps, minimum=1
        )
        self.recovery_every_steps = check_int(
            "recovery_every_steps", recovery_every_steps, minimum=1
        )
        self.recovery_growth = check_float(
            "recovery_growth", recovery_growth, minimum=1.0, inclusive_min=False
        )
        self.max_cuts = check_int("max_cuts", max_cuts, minimum=1)
        self.min_triggers = check_int("min_triggers", min_triggers, minimum=1)
        self.trigger_window = check_int("trigger_window", trigger_window, minimum=1)
        self.weight_faults = check_int("weight_faults", weight_faults, minimum=1)
        self.recent_triggers: list[int] = []  # steps of the triggers within the window
        self.recent_weight_faults: list[int] = []  # steps of corrupting updates, in the window
        self.factor = 1.0
        self.healthy_steps = 0
        self.last_cut_step: int | None = None
        self.emergency_cuts = 0

    @property
    def in_emergency(self) -> bool:
        """True from a cut until the factor is back at 1."""
        return self.factor < 1.0

    def weight_fault(self, step: int) -> bool:
        """Record an update that wrote non-finite weights at ``step``; whether it cuts (the
        ``weight_faults``-th within ``trigger_window`` steps)."""
        self.recent_weight_faults = [
            s for s in self.recent_weight_faults if step - s < self.trigger_window
        ] + [step]
        return len(self.recent_weight_faults) >= self.weight_faults

    def trigger(self, grad_norm: float, loss: float | None) -> Trigger | None:
        """The absolute threshold (if set) this step's host norm or loss is above, as a
        trigger for :meth:`update`, or ``None``."""
        norm_limit, loss_limit = self.grad_norm_threshold, self.loss_threshold
        if norm_limit is not None and grad_norm > norm_limit:
            return Trigger(
                Cause.GRAD_NORM_THRESHOLD, {"grad_norm": grad_norm, "threshold": norm_limit}
            )
        if loss_limit is not None and loss is not None and loss > loss_limit:
            return Trigger(Cause.LOSS_THRESHOLD, {"loss": loss, "threshold": loss_limit})
        return None

    def update(
        self,
        step: int,
        trigger: Trigger | None,
        is_healthy: bool = True,
        immediate: bool = False,
    ) -> LRChange | None:
        """Advance one step: maybe cut on ``trigger`` (its cause and numbers), else count
        towards recovery.

        ``is_healthy=False`` (a step skipped or rolled back for a reason that is not a
        trigger, e.g. an isolated loss spike) does not cut but is not a healthy step
        either: it restarts the recovery clock like a trigger in the cool-down does.
        ``immediate=True``: the trigger shows the update itself failing (non-finite
        weights, a state that keeps failing) and cuts without waiting for ``min_triggers``.
        """
        if trigger is None and not is_healthy:
            self.healthy_steps = 0
            return None
        if trigger is not None:
            self.healthy_steps = 0
            self.recent_triggers = [
                s for s in self.recent_triggers if step - s < self.trigger_window
            ] + [step]
            confirmed = len(self.recent_triggers) >= self.min_triggers
            if not (immediate or confirmed or self.in_emergency):
                return None
            if self.last_cut_step is not None and step - self.last_cut_step <= self.cooldown_steps:
                return None
            data = dict(trigger.data)
            if confirmed and not immediate and len(self.recent_triggers) > 1:
                data["triggers"] = float(len(self.recent_triggers))
                data["trigger_window"] = float(self.trigger_window)
            old = self.factor
            self.emergency_cuts = self.emergency_cuts + 1 if self.in_emergency else 1
            self.last_cut_step = step
            if self.emergency_cuts > self.max_cuts:
                return None  # the factor stays at its floor: the escalation decides the rest
            self.factor = old * self.cut_factor
            return LRChange(EventKind.LR_CUT, trigger.cause, old, self.factor, data, trigger.labels)
        self.healthy_steps += 1
        past = self.healthy_steps - self.recovery_after_steps
        if self.factor < 1.0 and past >= 0 and past % self.recovery_every_steps == 0:
            old = self.factor
            self.factor = min(1.0, old * self.recovery_growth)
            if self.factor == 1.0:
                self.emergency_cuts = 0
            return LRChange(
                EventKind.LR_RECOVERY,
                Cause.HEALTHY_STEPS,
                old,
                self.factor,
                {"healthy_steps": float(self.healthy_steps)},
            )
        return None

    def observe(self, numbers: StepNumbers) -> None:
        """Nothing to take: the step's outcome reaches this policy through :meth:`update`."""

    def state_dict(self) -> dict[str, Any]:
        """Factor, recovery clock and the cuts of the current emergency, as plain numbers."""
        return {
            "factor": self.factor,
            "healthy_steps": self.healthy_steps,
            "last_cut_step": self.last_cut_step,
            "emergency_cuts": self.emergency_cuts,
            "recent_triggers": list(self.recent_triggers),
            "recent_weight_faults": list(self.recent_weight_faults),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.factor = float(state_dict["factor"])
        self.healthy_steps = int(state_dict["healthy_steps"])
        self.last_cut_step = state_dict["last_cut_step"]
        self.emergency_cuts = int(state_dict["emergency_cuts"])
        # absent from state dicts saved before triggers were counted
        self.recent_triggers = [int(s) for s in state_dict.get("recent_triggers", [])]
        self.recent_weight_faults = [int(s) for s in state_dict.get("recent_weight_faults", [])]

    def __repr__(self) -> str:
        return (
            f"EmergencyLR(factor={self.cut_factor:g}, "
            f"grad_norm_threshold={self.grad_norm_threshold!r}, "
            f"loss_threshold={self.loss_threshold!r}, max_cuts={self.max_cuts}, "
            f"min_triggers={self.min_triggers}, trigger_window={self.trigger_window}, "
            f"weight_faults={self.weight_faults})"
        )


def _optional_threshold(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    return check_float(name, value, minimum=0.0, inclusive_min=False, allow_inf=True)
