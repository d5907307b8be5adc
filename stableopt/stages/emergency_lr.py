"""Emergency LR: cut the learning rate when training blows up, recover it gradually.

Decided on the host from numbers the step has already read (no extra sync); the
factor applies as a multiplier around the update (:mod:`stableopt.stages.lr_factor`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt.stages.base import StepNumbers
from stableopt.stages.lr_factor import LRChange

__all__ = ["EmergencyLR"]


class EmergencyLR:
    """Cut the LR when training blows up; bring it back gradually when it calms down.

    Triggers (each read in the step's one host read): a non-finite loss or
    gradient, weights that a step left non-finite, a total gradient norm above
    ``grad_norm_threshold``, a loss above ``loss_threshold``, and repeated loss
    spikes (from the spike guard).

    When a trigger cuts: an *isolated* bad batch (a NaN or Inf loss or gradient, a
    norm or loss above its threshold) is already handled by the step that met it
    (skipped, or clipped) and has touched nothing; cutting the LR for it only slows
    training. So those triggers cut when they repeat: the ``min_triggers``-th
    trigger within ``trigger_window`` steps cuts (3 within 20 by default, a failure
    rate of 15% where random bad batches are a few percent). A trigger that shows
    the *update* itself is failing cuts at once: non-finite weights after an
    update, and a run of spikes (``immediate=True`` in :meth:`update`). So does any
    trigger while the LR is already cut (a new emergency during recovery cuts from
    where the factor is). ``EmergencyLR(min_triggers=1)`` cuts on every trigger. A
    cut multiplies the factor by ``factor``; a trigger within ``cooldown_steps`` of
    the last cut counts as unhealthy but does not cut again (one burst, one cut).

    Recovery: after ``recovery_after_steps`` consecutive healthy steps the factor
    is multiplied by ``recovery_growth`` every ``recovery_every_steps`` healthy
    steps until it is back at 1: a geometric ramp, 0.1 -> 0.2 -> 0.4 -> 0.8 -> 1
    over 20 + 3 x 5 = 35 healthy steps with the defaults.
    A healthy step is an accepted step without a trigger; a step skipped or rolled
    back without a trigger (an isolated spike skip), or with a trigger that did
    not cut, is not healthy and restarts the count. In formulas,
    with one cut to ``c`` at step ``k`` and only healthy steps after it, the factor
    in force at step ``k + 1 + h`` (``h`` healthy steps done) is
    ``min(1, c * g**j)`` with ``j = 0`` for ``h < a`` and ``j = 1 + (h - a) // e``
    otherwise (``a``, ``e``, ``g``: ``recovery_after_steps``,
    ``recovery_every_steps``, ``recovery_growth``).

    Bounded: the cuts of one *emergency* (from a cut at factor 1 until the factor
    is back at 1) are at most ``max_emergencies``; one more declares the run
    diverging (:class:`~stableopt.DivergenceError`) rather than shrinking the LR
    to nothing. Counting per emergency rather than per fixed window means that
    isolated faults, each recovered from, never add up to a false divergence in a
    long run, while a run that keeps failing before it recovers is stopped.

    Args:
        factor: multiplier per cut (default 0.1, in (0, 1)).
        grad_norm_threshold: total norm that triggers a cut (default 1000.0, ``> 0``).
        loss_threshold: loss that triggers a cut (default 1e6, ``> 0``).
        min_lr: the effective LR is never cut below this (default 0.0, ``>= 0``).
        cooldown_steps: steps after a cut during which triggers do not cut again
            (default 10, ``>= 0``).
        recovery_after_steps: healthy steps before recovery starts (default 20, ``>= 1``).
        recovery_every_steps: healthy steps between recovery increments (default 5, ``>= 1``).
        recovery_growth: factor multiplier per increment (default 2.0, ``> 1``).
        max_emergencies: cuts allowed within one emergency (default 4, ``>= 1``).
        min_triggers: triggers within ``trigger_window`` steps that make a cut, outside
            an emergency (default 3, ``>= 1``; 1 cuts on every trigger).
        trigger_window: steps over which triggers are counted (default 20, ``>= 1``).
    """

    name = "emergency_lr"

    def __init__(
        self,
        factor: float = 0.1,
        grad_norm_threshold: float = 1000.0,
        loss_threshold: float = 1e6,
        min_lr: float = 0.0,
        cooldown_steps: int = 10,
        recovery_after_steps: int = 20,
        recovery_every_steps: int = 5,
        recovery_growth: float = 2.0,
        max_emergencies: int = 4,
        min_triggers: int = 3,
        trigger_window: int = 20,
    ) -> None:
        self.cut_factor = check_float(
            "factor", factor, minimum=0.0, maximum=1.0, inclusive_min=False
        )
        if self.cut_factor == 1.0:
            raise ValueError("factor must be < 1 (a cut), got 1.0")
        self.grad_norm_threshold = check_float(
            "grad_norm_threshold",
            grad_norm_threshold,
            minimum=0.0,
            inclusive_min=False,
            allow_inf=True,
        )
        self.loss_threshold = check_float(
            "loss_threshold", loss_threshold, minimum=0.0, inclusive_min=False, allow_inf=True
        )
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
        self.max_emergencies = check_int("max_emergencies", max_emergencies, minimum=1)
        self.min_triggers = check_int("min_triggers", min_triggers, minimum=1)
        self.trigger_window = check_int("trigger_window", trigger_window, minimum=1)
        self.recent_triggers: list[int] = []  # steps of the triggers within the window
        self.factor = 1.0
        self.healthy_steps = 0
        self.last_cut_step: int | None = None
        self.emergency_cuts = 0

    @property
    def in_emergency(self) -> bool:
        """True from a cut until the factor is back at 1."""
        return self.factor < 1.0

    @property
    def is_exhausted(self) -> bool:
        """More than ``max_emergencies`` cuts within the current emergency."""
        return self.emergency_cuts > self.max_emergencies

    def triggers(self, grad_norm: float, loss: float | None) -> dict[str, bool]:
        """Which thresholds this step's (host) norm and loss are above."""
        return {
            "grad_norm_above_threshold": grad_norm > self.grad_norm_threshold,
            "loss_above_threshold": loss is not None and loss > self.loss_threshold,
        }

    def update(
        self, step: int, trigger: str | None, is_healthy: bool = True, immediate: bool = False
    ) -> LRChange | None:
        """Advance one step: maybe cut on ``trigger`` (a reason), else count towards recovery.

        ``is_healthy=False`` (a step skipped or rolled back for a reason that is not a
        trigger, e.g. an isolated loss spike) does not cut but is not a healthy step
        either: it restarts the recovery clock like a trigger in the cool-down does.
        ``immediate=True``: the trigger shows the update itself failing (non-finite
        weights, a run of spikes) and cuts without waiting for ``min_triggers``.
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
            if confirmed and not immediate and len(self.recent_triggers) > 1:
                trigger = (
                    f"{trigger} ({len(self.recent_triggers)} triggers within "
                    f"{self.trigger_window} steps)"
                )
            old = self.factor
            self.emergency_cuts = self.emergency_cuts + 1 if self.in_emergency else 1
            self.factor = old * self.cut_factor
            self.last_cut_step = step
            return LRChange(
                "lr_cut",
                f"{trigger}: LR factor cut {old:.4g} -> {self.factor:.4g}",
                old,
                self.factor,
            )
        self.healthy_steps += 1
        past = self.healthy_steps - self.recovery_after_steps
        if self.factor < 1.0 and past >= 0 and past % self.recovery_every_steps == 0:
            old = self.factor
            self.factor = min(1.0, old * self.recovery_growth)
            done = " (recovered)" if self.factor == 1.0 else ""
            if self.factor == 1.0:
                self.emergency_cuts = 0
            return LRChange(
                "lr_recovery",
                f"{self.healthy_steps} healthy steps: LR factor {old:.4g} -> {self.factor:.4g}{done}",
                old,
                self.factor,
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
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.factor = float(state_dict["factor"])
        self.healthy_steps = int(state_dict["healthy_steps"])
        self.last_cut_step = state_dict["last_cut_step"]
        self.emergency_cuts = int(state_dict["emergency_cuts"])
        # absent from state dicts saved before triggers were counted
        self.recent_triggers = [int(s) for s in state_dict.get("recent_triggers", [])]

    def __repr__(self) -> str:
        return (
            f"EmergencyLR(factor={self.cut_factor:g}, grad_norm_threshold={self.grad_norm_threshold:g}, "
            f"loss_threshold={self.loss_threshold:g}, max_emergencies={self.max_emergencies}, "
            f"min_triggers={self.min_triggers}, trigger_window={self.trigger_window})"
        )
