"""Emergency clipping: a tighter threshold while the gradients explode.

An emergency is a total norm above ``ratio`` times the median of the last
``window_steps`` accepted norms (the run's own level, so the rule means the same for
a norm of 1e-3 and of 1e5), or above an absolute ``threshold`` when one is given.
An emergency step is clipped to ``factor`` times the policy's threshold, and the
reduced threshold holds for ``cooldown_steps`` more steps (a burst of explosions
rarely comes alone). A norm above ``skip_above`` (off by default) is taken for
garbage and the step is skipped instead.

:meth:`EmergencyClip.limit` is one formula for a float norm and a 0-dim tensor
(no host sync on the device); the level and the cool-down are host state advanced by
:meth:`EmergencyClip.observe` once the step is over.

When the run moves to a new level for good (the escalation takes a few spikes at one
level as the new normal, :class:`~stableopt.escalation.Escalation`), :meth:`rebase`
restarts the level from it. (Holding the old level instead, so that the first steps
at the new one are clipped hard until they fill half the window, was measured worse:
AdamW then meets the jump in scale later, when its second moment has adapted to the
clipped gradients, and ends 1.17x plain AdamW's loss on a x1e5 loss stage where taking
the new level at once ends at 0.94x.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt._num import Num, finite_or, where
from stableopt.stages._window import RobustWindow
from stableopt.stages.base import StepNumbers

__all__ = ["EmergencyClip"]


class EmergencyClip:
    """Halve the clip threshold while the norm explodes; optionally skip absurd norms.

    Args:
        ratio: a norm above ``ratio`` times the median of the recent accepted norms is
            an emergency (default 10.0, ``> 1``). Ignored when ``threshold`` is given.
        factor: multiplier of the policy's threshold during an emergency (default 0.5, in (0, 1]).
        cooldown_steps: how many steps after the last emergency the reduced
            threshold still holds (default 10, ``>= 0``).
        window_steps: accepted norms the level is the median of (default 64, ``>= 1``).
        min_history: accepted norms needed before the relative rule acts (default 8,
            in [1, window_steps]).
        threshold: an absolute norm above which a step is an emergency instead
            (default ``None``: relative to the run's level; ``> 0``).
        skip_above: skip any step whose norm is above this (default ``None``: never;
            an absolute number, above ``threshold`` when both are given).
    """

    name = "emergency_clip"

    def __init__(
        self,
        ratio: float = 10.0,
        factor: float = 0.5,
        cooldown_steps: int = 10,
        window_steps: int = 64,
        min_history: int = 8,
        threshold: float | None = None,
        skip_above: float | None = None,
    ) -> None:
        self.ratio = check_float("ratio", ratio, minimum=1.0, inclusive_min=False)
        self.factor = check_float("factor", factor, minimum=0.0, maximum=1.0, inclusive_min=False)
        self.cooldown_steps = check_int("cooldown_steps", cooldown_steps, minimum=0)
        self.window_steps = check_int("window_steps", window_steps, minimum=1)
        self.min_history = check_int("min_history", min_history, minimum=1)
        if self.min_history > self.window_steps:
            raise ValueError(
                f"min_history must be <= window_steps ({self.window_steps}), got {min_history}"
            )
        self.absolute_threshold = (
            None
            if threshold is None
            else check_float("threshold", threshold, minimum=0.0, inclusive_min=False)
        )
        if skip_above is not None:
            skip_above = check_float(
                "skip_above", skip_above, minimum=threshold or 0.0, inclusive_min=False
            )
        self.skip_above = skip_above
        self.cooldown_left = 0  # steps the reduced threshold still holds (host)
        self._norms = RobustWindow(self.window_steps)

    @property
    def threshold(self) -> float | None:
        """The norm above which a step is an emergency now (``None`` while the level is
        not known: fewer than ``min_history`` accepted norms)."""
        if self.absolute_threshold is not None:
            return self.absolute_threshold
        if len(self._norms.values) < self.min_history:
            return None
        return self.ratio * self._norms.median()

    def limit(self, max_norm: Num, grad_norm: Num) -> Num:
        """The max norm of this step: the policy's ``max_norm``, times ``factor`` in an emergency.

        An emergency is a norm above :attr:`threshold`, or any step of the cool-down. A
        policy that does not clip this step (``max_norm`` is ``inf``: warming up, or a
        unit-wise policy) is reduced from :attr:`threshold` instead.
        """
        threshold = self.threshold
        if threshold is None:
            return max_norm
        reduced = finite_or(max_norm, threshold) * self.factor
        if self.cooldown_left > 0:  # host state: the whole step is an emergency
            return reduced
        return where(grad_norm > threshold, reduced, max_norm)

    def observe(self, numbers: StepNumbers) -> None:
        """Advance the cool-down on an accepted step: restart it on an explosion, else count down."""
        if not numbers.is_accepted or not math.isfinite(numbers.grad_norm):
            return
        threshold = self.threshold
        if threshold is not None and numbers.grad_norm > threshold:
            self.cooldown_left = self.cooldown_steps
        else:
            self.cooldown_left = max(self.cooldown_left - 1, 0)
        self._norms.append(numbers.grad_norm)

    def rebase(self, level: Sequence[StepNumbers]) -> None:
        """Restart the level from ``level`` (the norms of a new level); end any cool-down."""
        self._norms.clear()
        self.cooldown_left = 0
        for numbers in level:
            if math.isfinite(numbers.grad_norm):
                self._norms.append(numbers.grad_norm)

    def state_dict(self) -> dict[str, Any]:
        """The cool-down counter, and the recent norms as a ring (CPU float64) and count."""
        return {
            "cooldown_left": self.cooldown_left,
            "norms": self._norms.ring(),
            "count": self._norms.count,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.cooldown_left = int(state_dict["cooldown_left"])
        ring: Tensor | None = state_dict.get("norms")
        self._norms.load_ring(ring, int(state_dict.get("count", 0)) if ring is not None else None)

    def __repr__(self) -> str:
        threshold = "None" if self.absolute_threshold is None else f"{self.absolute_threshold:g}"
        skip = "None" if self.skip_above is None else f"{self.skip_above:g}"
        return (
            f"EmergencyClip(ratio={self.ratio:g}, factor={self.factor:g}, "
            f"cooldown_steps={self.cooldown_steps}, window_steps={self.window_steps}, "
            f"threshold={threshold}, skip_above={skip})"
        )
