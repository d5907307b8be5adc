"""Emergency clipping: a tighter threshold while the gradients explode.

When the total norm exceeds ``threshold`` the step is clipped to half of the
policy's threshold, and the halved threshold holds for ``cooldown_steps`` more
steps (a burst of explosions rarely comes alone). A norm above ``skip_above``
(off by default) is taken for garbage and the step is skipped instead.

All of it is device arithmetic on 0-dim tensors: the decision costs no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt.clipping import ClipDecision, clip_coefficient

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
        self._cooldown_left: Tensor | None = None

    def adjust(self, grad_norm: Tensor, decision: ClipDecision) -> ClipDecision:
        """Apply the emergency rule to a policy's decision for this step's ``grad_norm``."""
        cooldown_left = self._cooldown(grad_norm.device)
        is_explosion = grad_norm > self.threshold
        in_emergency = is_explosion | (cooldown_left > 0)
        # A policy with no total-norm threshold (unit-wise, or warming up) gets the
        # emergency threshold itself as the base to reduce.
        base = torch.where(
            torch.isfinite(decision.threshold),
            decision.threshold,
            torch.full_like(decision.threshold, self.threshold),
        )
        reduced = base * self.factor
        threshold = torch.where(in_emergency, reduced, decision.threshold)
        coefficient = decision.coefficient
        if coefficient is None:
            coefficient = torch.ones_like(grad_norm)
        coefficient = torch.where(in_emergency, clip_coefficient(reduced, grad_norm), coefficient)
        is_garbage = (grad_norm > self.skip_above) if self.skip_above is not None else None
        return decision._replace(
            coefficient=coefficient,
            threshold=threshold,
            is_clipped=decision.is_clipped | (coefficient < 1.0),
            is_emergency=is_explosion,
            is_garbage=is_garbage,
        )

    def observe(self, grad_norm: Tensor, is_accepted: Tensor) -> None:
        """Advance the cool-down on an accepted step: restart it on an explosion, else count down."""
        cooldown_left = self._cooldown(grad_norm.device)
        advanced = torch.where(
            grad_norm > self.threshold,
            torch.full_like(cooldown_left, self.cooldown_steps),
            (cooldown_left - 1).clamp(min=0),
        )
        self._cooldown_left = torch.where(is_accepted, advanced, cooldown_left)

    def _cooldown(self, device: torch.device) -> Tensor:
        if self._cooldown_left is None or self._cooldown_left.device != device:
            value = 0 if self._cooldown_left is None else int(self._cooldown_left)
            self._cooldown_left = torch.tensor(value, dtype=torch.int64, device=device)
        return self._cooldown_left

    def state_dict(self) -> dict[str, Any]:
        """The cool-down counter (a plain int)."""
        return {"cooldown_left": 0 if self._cooldown_left is None else int(self._cooldown_left)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._cooldown_left = torch.tensor(int(state_dict["cooldown_left"]), dtype=torch.int64)

    def __repr__(self) -> str:
        skip = "None" if self.skip_above is None else f"{self.skip_above:g}"
        return (
            f"EmergencyClip(threshold={self.threshold:g}, factor={self.factor:g}, "
            f"cooldown_steps={self.cooldown_steps}, skip_above={skip})"
        )
