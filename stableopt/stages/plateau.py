"""Plateau LR: lower the learning rate when the training loss stops improving.

Decided on the host from the losses the steps have already read (no extra sync);
the factor applies as a multiplier around the update (:mod:`stableopt.stages.lr_factor`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from stableopt._checks import check_float, check_int
from stableopt.outcomes import Cause, EventKind
from stableopt.stages._rings import from_ring, to_ring
from stableopt.stages.base import StepNumbers
from stableopt.stages.lr_factor import LRChange

__all__ = ["PlateauLR"]


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

    name = "plateau"

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

    def observe(self, numbers: StepNumbers) -> None:
        """Append an accepted step's loss to the window (a step without a loss adds nothing)."""
        if numbers.is_accepted and numbers.loss is not None:
            self._losses.append(numbers.loss)
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
        return LRChange(EventKind.PLATEAU, Cause.LOSS_PLATEAU, old, self.factor, why)

    def is_plateau(self, losses: np.ndarray) -> tuple[bool, dict[str, float]]:
        """The trend test on a window of losses in time order; returns the verdict and the
        numbers behind it (the window, the fall, its p-value, what progress needs)."""
        # Imported here: scipy.stats costs more to import than the rest of the package.
        from scipy import stats as scipy_stats

        steps = np.arange(len(losses), dtype=np.float64)
        fit = scipy_stats.linregress(steps, losses)
        mean = float(np.mean(losses))
        decrease = -fit.slope * (len(losses) - 1) / abs(mean) if mean != 0 else 0.0
        p_down = fit.pvalue / 2 if fit.slope < 0 else 1.0 - fit.pvalue / 2
        if math.isnan(p_down):  # a constant window: no trend at all
            p_down = 1.0
        improving = p_down < self.significance and decrease >= self.threshold
        why = {
            "window": float(len(losses)),
            "decrease": float(decrease),
            "p": float(p_down),
            "threshold": self.threshold,
            "significance": self.significance,
        }
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

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
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
