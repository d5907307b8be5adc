"""Emergency clipping: a tighter threshold while the gradients explode.

When the total norm exceeds ``threshold`` the step is clipped to half of the
policy's threshold, and the halved threshold holds for ``cooldown_steps`` more
steps (a burst of explosions rarely comes alone). A norm above ``skip_above``
(off by default) is taken for garbage and the step is skipped instead.

The decision is device arithmetic on 0-dim tensors (no host sync); the cool-down
is a host counter advanced from the step's one read of the norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt._host import as_bool, as_float
from stableopt.clipping import ClipDecision, ClipPolicy, clip_coefficient, decision_for

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

    def decide(
        self, policy: ClipPolicy, grad_norm: Tensor, grads: list[Tensor], params: list[Tensor]
    ) -> ClipDecision:
        """``policy``'s decision for this step with the emergency rule applied.

        For a total-norm policy the rule acts on its max norm before the coefficient
        is computed (one coefficient, not two); a policy that clips in place gets
        :meth:`adjust` on its decision.
        """
        if policy.clips_in_place:
            return self.adjust(grad_norm, policy.decide(grad_norm, grads, params))
        max_norm = policy.max_norm(grad_norm)
        is_explosion = None if self.cooldown_left > 0 else grad_norm > self.threshold
        threshold = self.limit(max_norm, grad_norm, is_explosion)
        return decision_for(threshold, grad_norm)._replace(
            is_emergency=is_explosion, is_garbage=self._garbage(grad_norm)
        )

    def limit(
        self, max_norm: Tensor | float, grad_norm: Tensor | float, is_explosion: Any = None
    ) -> Tensor | float:
        """The max norm of this step: ``max_norm`` (the policy's), halved in an emergency.

        With float arguments (the host decides) the result is a float.
        """
        if isinstance(max_norm, Tensor):
            reduced: Tensor | float = self._base(max_norm) * self.factor
        else:
            reduced = (max_norm if math.isfinite(max_norm) else self.threshold) * self.factor
        if self.cooldown_left > 0:  # host state: the whole step is an emergency
            return reduced
        if is_explosion is None:
            is_explosion = grad_norm > self.threshold
        if isinstance(is_explosion, Tensor):
            return torch.where(is_explosion, reduced, max_norm)
        return reduced if is_explosion else max_norm

    def adjust(self, grad_norm: Tensor, decision: ClipDecision) -> ClipDecision:
        """Apply the emergency rule to a policy's decision for this step's ``grad_norm``."""
        is_explosion = grad_norm > self.threshold
        reduced = self._base(decision.threshold) * self.factor
        reduced_coefficient = clip_coefficient(reduced, grad_norm)
        coefficient = decision.coefficient
        if self.cooldown_left > 0:  # host state: the whole step is an emergency
            threshold, coefficient = reduced, reduced_coefficient
        else:
            threshold = torch.where(is_explosion, reduced, decision.threshold)
            if coefficient is None:
                coefficient = torch.ones_like(grad_norm)
            coefficient = torch.where(is_explosion, reduced_coefficient, coefficient)
        is_clipped = None  # coefficient < 1, told on the host
        if decision.coefficient is None:  # clipped in place, or clipped now
            in_place = decision.is_clipped
            is_clipped = coefficient < 1.0 if in_place is None else in_place | (coefficient < 1.0)
        return decision._replace(
            coefficient=coefficient,
            threshold=threshold,
            is_clipped=is_clipped,
            is_emergency=is_explosion,
            is_garbage=self._garbage(grad_norm),
        )

    def _base(self, threshold: Tensor) -> Tensor:
        """The threshold to reduce: the policy's, or (none: unit-wise, warming up) ours."""
        return torch.nan_to_num(
            threshold, nan=self.threshold, posinf=self.threshold, neginf=self.threshold
        )

    def _garbage(self, grad_norm: Tensor) -> Tensor | None:
        return (grad_norm > self.skip_above) if self.skip_above is not None else None

    def observe(self, grad_norm: Tensor | float, is_accepted: Tensor | bool) -> None:
        """Advance the cool-down on an accepted step: restart it on an explosion, else count down."""
        if not as_bool(is_accepted):
            return
        if as_float(grad_norm) > self.threshold:
            self.cooldown_left = self.cooldown_steps
        else:
            self.cooldown_left = max(self.cooldown_left - 1, 0)

    def state_dict(self) -> dict[str, Any]:
        """The cool-down counter (a plain int)."""
        return {"cooldown_left": self.cooldown_left}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.cooldown_left = int(state_dict["cooldown_left"])

    def __repr__(self) -> str:
        skip = "None" if self.skip_above is None else f"{self.skip_above:g}"
        return (
            f"EmergencyClip(threshold={self.threshold:g}, factor={self.factor:g}, "
            f"cooldown_steps={self.cooldown_steps}, skip_above={skip})"
        )
