"""Emergency clipping: a tighter threshold while the gradients explode.

When the total norm exceeds ``threshold`` the step is clipped to half of the
policy's threshold, and the halved threshold holds for ``cooldown_steps`` more
steps (a burst of explosions rarely comes alone). A norm above ``skip_above``
(off by default) is taken for garbage and the step is skipped instead.

:meth:`EmergencyClip.limit` is one formula for a float norm and a 0-dim tensor
(no host sync on the device); the cool-down is a host counter advanced by
:meth:`EmergencyClip.observe` once the step is over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt._num import Num, finite_or, where
from stableopt.stages.base import StepNumbers

__all__ = ["EmergencyClip"]


class EmergencyClip:
    """Halve the clip threshold for explosions; optionally skip absurd norms.

    Args:
        threshold: total norm above which a step is an emergency (default 1000.0, ``> 0``).
        factor: multiplier of the policy's threshold during an emergency (default 0.5, in (0, 1]).
        cooldown_steps: how many steps after the last emergency the reduced
            threshold still holds (default 10, ``>= 0``).
        skip_above: skip any step whose norm is above this (default ``None``: never).
    """

    name = "emergency_clip"

    def __init__(
        self,
        threshold: float = 1000.0,
        factor: float = 0.5,
        cooldown_steps: int = 10,
        skip_above: float | None = None,
    ) -> None:
        self.threshold = check_float("threshold", threshold, minimum=0.0, inclusive_min=False)
        self.factor = check_float("factor", factor, minimum=0.0, maximum=1.0, inclusive_min=False)
        self.cooldown_steps = check_int("cooldown_steps", cooldown_steps, minimum=0)
        if skip_above is not None:
            skip_above = check_float(
                "skip_above", skip_above, minimum=self.threshold, inclusive_min=False
            )
        self.skip_above = skip_above
        self.cooldown_left = 0  # steps the halved threshold still holds (host)

    def limit(self, max_norm: Num, grad_norm: Num) -> Num:
        """The max norm of this step: the policy's ``max_norm``, times ``factor`` in an emergency.

        An emergency is a norm above ``threshold``, or any step of the cool-down. A
        policy that does not clip this step (``max_norm`` is ``inf``: warming up, or a
        unit-wise policy) is reduced from ``threshold`` instead.
        """
        reduced = finite_or(max_norm, self.threshold) * self.factor
        if self.cooldown_left > 0:  # host state: the whole step is an emergency
            return reduced
        return where(grad_norm > self.threshold, reduced, max_norm)

    def observe(self, numbers: StepNumbers) -> None:
        """Advance the cool-down on an accepted step: restart it on an explosion, else count down."""
        if not numbers.is_accepted:
            return
        if numbers.grad_norm > self.threshold:
            self.cooldown_left = self.cooldown_steps
        else:
            self.cooldown_left = max(self.cooldown_left - 1, 0)

    def state_dict(self) -> dict[str, Any]:
        """The cool-down counter (a plain int)."""
        return {"cooldown_left": self.cooldown_left}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.cooldown_left = int(state_dict["cooldown_left"])

    def __repr__(self) -> str:
        skip = "None" if self.skip_above is None else f"{self.skip_above:g}"
        return (
            f"EmergencyClip(threshold={self.threshold:g}, factor={self.factor:g}, "
            f"cooldown_steps={self.cooldown_steps}, skip_above={skip})"
        )
