"""The verify stage: when the pipeline checks that the weights are finite, and the check.

``"lazy"`` (the default): only when a step's gradients or loss are non-finite (how a
NaN weight shows itself at the next step) and before every snapshot, so a healthy
step pays nothing and a snapshot never holds a corrupted state; a corrupting update
is rolled back at the next step. ``"every_step"``: after every update (one foreach
pass over the updated weights), so it is rolled back in the same step. ``"off"``:
never.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from stableopt._checks import check_choice
from stableopt.grad_norms import all_finite
from stableopt.verdict import StepVerdict

__all__ = ["WEIGHT_CHECKS", "WeightCheck"]

WEIGHT_CHECKS = ("lazy", "every_step", "off")


class WeightCheck:
    """When to check the weights (see the module docstring), and the check itself.

    Args:
        mode: ``"lazy"``, ``"every_step"`` or ``"off"``.
    """

    def __init__(self, mode: str) -> None:
        self.mode = check_choice("check_weights", mode, WEIGHT_CHECKS)

    @property
    def after_every_update(self) -> bool:
        """Whether the weights an update wrote are checked in the same step."""
        return self.mode == "every_step"

    def verify(
        self, verdict: StepVerdict, updated: list[Tensor], every: list[Tensor], snapshot_due: bool
    ) -> StepVerdict:
        """``verdict`` with ``weights_ok`` filled in where this step needs a check.

        ``updated``: the parameters this step's update wrote; ``every``: all of them.
        """
        if self.mode == "off":
            return verdict
        if verdict.weights_ok is None and verdict.is_accepted and self.after_every_update:
            verdict = replace(verdict, weights_ok=bool(all_finite(updated)))
        if verdict.weights_ok is False:
            return verdict
        suspect = not verdict.grads_finite or not verdict.loss_finite
        if self.mode == "lazy" and verdict.is_accepted and snapshot_due:
            suspect = True  # a snapshot must never copy a corrupted state
        if suspect:
            verdict = replace(verdict, weights_ok=bool(all_finite(every)))
        return verdict
