"""Learning-rate control: emergency cuts with recovery, plateau reductions, and how they apply.

**The composition rule.** Our LR changes are multipliers, never writes into the
user's schedule. Each policy keeps a factor (1.0 = no change); just around the
inner optimizer's update, every group's ``lr`` is replaced by
``schedule_lr * emergency_factor * plateau_factor`` (never below ``min_lr``,
unless the schedule itself is lower; never above ``max_lr``) and put back right
after. So ``group["lr"]`` as the user and the LR scheduler read and write it
between steps is always the *scheduled* LR; a cosine or warm-up schedule keeps
running underneath our cut instead of erasing it one step later.
:meth:`stableopt.SafeOptimizer.effective_lr` gives the LR actually used.

Both policies decide on the host from numbers the step has already read (no
extra sync); the plateau test runs on its host window of losses once every
``check_every_steps`` steps.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt._host import as_bool, as_float, from_ring, to_ring

__all__ = ["EmergencyLR", "LRChange", "PlateauLR", "effective_lr", "scaled_lr"]

log = logging.getLogger(__name__)


class LRChange(NamedTuple):
    """One change of a factor: what the monitor records as an event."""

    kind: str
    reason: str
    old_factor: float
    new_factor: float


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

    def state_dict(self) -> dict[str, Any]:
        """Factor, recovery clock and the cuts of the current emergency, as plain numbers."""
        return {
            "factor": self.factor,
            "healthy_steps": self.healthy_steps,
            "last_cut_step": self.last_cut_step,
            "emergency_cuts": self.emergency_cuts,
            "recent_triggers": list(self.recent_triggers),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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


class PlateauLR:
    """Lower the LR when the (noisy, per-step) training loss stops improving.

    A raw ``ReduceLROnPlateau`` on minibatch losses fires on noise. Here the last
    ``patience_steps`` accepted losses are tested for a downward trend by ordinary
    least squares (``scipy.stats.linregress``): the loss is *improving* when the
    slope is negative with one-sided p-value below ``significance`` **and** the
    fitted decrease over the window is at least ``threshold`` of the mean loss.
    Otherwise it is a plateau: the factor is multiplied by ``factor`` and the test
    waits for ``cooldown_steps`` and then ``patience_steps`` fresh losses.

    Skipped steps never enter the window, and any intervention (skip, rollback,
    emergency cut) restarts it: the steady fall back after a spike looks like
    progress and the slow phase after it like a plateau, which is how
    ``ReduceLROnPlateau`` goes wrong (pytorch issue 30873).

    Losses are kept on the host (the pipeline reads each step's loss with its
    other numbers); the test runs once every ``check_every_steps`` steps.

    Args:
        patience_steps: losses in the tested window (default 500, ``>= 3``).
        factor: multiplier per reduction (default 0.5, in (0, 1)).
        threshold: the relative decrease over the window that counts as progress
            (default 0.01, ``>= 0``).
        significance: p-value below which a downward slope is real (default 0.05, in (0, 1)).
        cooldown_steps: steps after a reduction before testing again (default 100, ``>= 0``).
        min_lr: the effective LR is never reduced below this (default 0.0, ``>= 0``).
        max_lr: a cap on the effective LR (default ``None``: no cap; see the docs).
        check_every_steps: how often the test runs (default 50, ``>= 1``).
    """

    def __init__(
        self,
        patience_steps: int = 500,
        factor: float = 0.5,
        threshold: float = 0.01,
        significance: float = 0.05,
        cooldown_steps: int = 100,
        min_lr: float = 0.0,
        max_lr: float | None = None,
        check_every_steps: int = 50,
    ) -> None:
        self.patience_steps = check_int("patience_steps", patience_steps, minimum=3)
        self.reduce_factor = check_float(
            "factor", factor, minimum=0.0, maximum=1.0, inclusive_min=False
        )
        if self.reduce_factor == 1.0:
            raise ValueError("factor must be < 1 (a reduction), got 1.0")
        self.threshold = check_float("threshold", threshold, minimum=0.0)
        self.significance = check_float(
            "significance", significance, minimum=0.0, maximum=1.0, inclusive_min=False
        )
        self.cooldown_steps = check_int("cooldown_steps", cooldown_steps, minimum=0)
        self.min_lr = check_float("min_lr", min_lr, minimum=0.0)
        self.max_lr = (
            None
            if max_lr is None
            else check_float("max_lr", max_lr, minimum=0.0, inclusive_min=False)
        )
        if self.max_lr is not None and self.max_lr < self.min_lr:
            raise ValueError(f"max_lr must be >= min_lr ({self.min_lr:g}), got {self.max_lr:g}")
        self.check_every_steps = check_int("check_every_steps", check_every_steps, minimum=1)
        self.factor = 1.0
        self.cooldown_left = 0
        self.steps_since_check = 0
        self.count = 0  # accepted losses since the last restart
        self._losses: deque[float] = deque(maxlen=self.patience_steps)

    def observe(self, loss: Tensor | float, is_accepted: Tensor | bool) -> None:
        """Append this step's loss to the window if the step was accepted.

        The pipeline passes the host value of its one read; a tensor is read here.
        """
        if as_bool(is_accepted):
            self._losses.append(as_float(loss))
            self.count += 1

    def restart(self) -> None:
        """Forget the window (after an intervention); the test waits for fresh losses."""
        self._losses.clear()
        self.count = 0
        self.steps_since_check = 0

    def update(self) -> LRChange | None:
        """Called once per step on the host; every ``check_every_steps`` runs the test."""
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            if self.cooldown_left == 0:
                self.restart()
            return None
        self.steps_since_check += 1
        if self.steps_since_check < self.check_every_steps:
            return None
        self.steps_since_check = 0
        if self.count < self.patience_steps:
            return None
        is_plateau, why = self.is_plateau(np.asarray(self._losses, dtype=np.float64))
        if not is_plateau:
            return None
        old = self.factor
        self.factor = old * self.reduce_factor
        self.cooldown_left = self.cooldown_steps
        self.restart()
        return LRChange(
            "plateau", f"{why}: LR factor {old:.4g} -> {self.factor:.4g}", old, self.factor
        )

    def is_plateau(self, losses: np.ndarray) -> tuple[bool, str]:
        """The trend test on a window of losses in time order; returns the verdict and why."""
        steps = np.arange(len(losses), dtype=np.float64)
        fit = scipy_stats.linregress(steps, losses)
        mean = float(np.mean(losses))
        decrease = -fit.slope * (len(losses) - 1) / abs(mean) if mean != 0 else 0.0
        p_down = fit.pvalue / 2 if fit.slope < 0 else 1.0 - fit.pvalue / 2
        if math.isnan(p_down):  # a constant window: no trend at all
            p_down = 1.0
        improving = p_down < self.significance and decrease >= self.threshold
        why = (
            f"loss over the last {len(losses)} steps fell {100 * decrease:.2f}% (p={p_down:.3g}); "
            f"progress needs {100 * self.threshold:.2f}% at p<{self.significance:g}"
        )
        return not improving, why

    def state_dict(self) -> dict[str, Any]:
        """Factor, cool-down, and the loss window (a ring of ``patience_steps``, CPU float64)."""
        return {
            "factor": self.factor,
            "cooldown_left": self.cooldown_left,
            "steps_since_check": self.steps_since_check,
            "losses": to_ring(self._losses, self.count, self.patience_steps),
            "count": self.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.factor = float(state_dict["factor"])
        self.cooldown_left = int(state_dict["cooldown_left"])
        self.steps_since_check = int(state_dict["steps_since_check"])
        losses, count = state_dict["losses"], state_dict["count"]
        self._losses.clear()
        self.count = 0 if count is None else int(count)
        if losses is not None:
            self._losses.extend(from_ring(losses, self.count, self.patience_steps))

    def __repr__(self) -> str:
        return (
            f"PlateauLR(patience_steps={self.patience_steps}, factor={self.reduce_factor:g}, "
            f"threshold={self.threshold:g}, cooldown_steps={self.cooldown_steps})"
        )
