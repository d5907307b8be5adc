"""What a step decided: :class:`StepVerdict`, a frozen record of host values; and what it
did in the end: :class:`StepOutcome` (``SafeOptimizer.last_step``).

The gate (:mod:`stableopt.gate`) produces one per ``step()``; the weight check may
add whether the weights are finite (:func:`dataclasses.replace`); the response
(:mod:`stableopt.response`) and every stage read it, and the response writes the
outcome. Nothing in either is a tensor, so reading them never syncs a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stableopt.outcomes import AnyCause, SkipReason
from stableopt.stages.base import StepNumbers

__all__ = ["SkipReason", "StepOutcome", "StepStatus", "StepVerdict"]

#: What a ``step()`` did with its update: kept it, skipped it, undid it (a rollback), or
#: stopped the run (:class:`~stableopt.DivergenceError`).
StepStatus = Literal["updated", "skipped", "rolled_back", "stopped"]


@dataclass(frozen=True, slots=True)
class StepVerdict:
    """One step's decision and the numbers behind it (host values).

    Attributes:
        step: the number of the step (``1`` for the first ``step()`` call).
        grad_norm: the total gradient norm before clipping (unscaled under GradScaler).
        loss: the step's loss (mean over ranks), or ``None`` when none was given.
        is_accepted: the update ran (``skip_reason`` is ``None``).
        skip_reason: why the step was skipped, or ``None``.
        clip_threshold: the max total norm in force (``inf`` when the policy does not
            clip this step; ``None`` when clipping is off).
        clip_coefficient: the factor the gradients were multiplied by (``1.0``: unchanged).
        is_clipped: the gradients were scaled down (by the coefficient, or in place by a
            unit-wise policy).
        is_emergency: the norm was above the emergency threshold, so the reduced limit of
            :class:`~stableopt.stages.emergency_clip.EmergencyClip` applied.
        is_spike_clipped: the norm was a spike (above the spike guard's bound) with an
            ordinary loss: clipped to the bound instead of skipped (a clip policy is on).
        weights_ok: whether every weight (and its optimizer state) was finite after the
            step; ``None`` when the weights were not checked.
        bad_params: the parameters found non-finite (indices in the optimizer's
            ``param_groups`` order), when the check tells them apart.
        bad_buffers: the model's buffers the step's forward pass left non-finite
            (indices into ``SafeOptimizer.model_buffers.buffers``), checked on an accepted
            step.
        rule: the name of the skip rule (``SafeOptimizer(skip_rules=...)``) whose bound the
            step crossed (``skip_reason`` is ``SkipReason.RULE``), else ``None``.
    """

    step: int
    grad_norm: float
    loss: float | None
    is_accepted: bool
    skip_reason: SkipReason | None
    clip_threshold: float | None = None
    clip_coefficient: float = 1.0
    is_clipped: bool = False
    is_emergency: bool = False
    is_spike_clipped: bool = False
    weights_ok: bool | None = None
    bad_params: tuple[int, ...] = ()
    bad_buffers: tuple[int, ...] = ()
    rule: str | None = None

    @property
    def grads_finite(self) -> bool:
        """Every gradient value was finite (read from the norm)."""
        return math.isfinite(self.grad_norm)

    @property
    def loss_finite(self) -> bool:
        """The loss was finite (``True`` without a loss)."""
        return self.loss is None or math.isfinite(self.loss)

    @property
    def is_spike(self) -> bool:
        """The step was skipped as a spike (of the loss, the gradient norm or the running
        statistics)."""
        return self.skip_reason in (
            SkipReason.LOSS_SPIKE,
            SkipReason.GRAD_NORM_SPIKE,
            SkipReason.NORM_STATS_SPIKE,
        )

    @property
    def numbers(self) -> StepNumbers:
        """What the stages observe of this step."""
        return StepNumbers(self.grad_norm, self.loss, self.is_accepted, self.step)


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What one ``step()`` did in the end (host values, read without a sync).

    Attributes:
        step: the number of the step (``1`` for the first ``step()`` call).
        status: ``"updated"`` (the update ran and was kept), ``"skipped"`` (it did not run:
            weights and optimizer state unchanged), ``"rolled_back"`` (weights and state
            went back to a snapshot: all of them, or the corrupted parameters) or
            ``"stopped"`` (the step raised :class:`~stableopt.DivergenceError`).
        reason: why it was skipped, rolled back or stopped, in words (the event's reason);
            ``None`` when updated.
        skip_reason: the skip's :class:`SkipReason` (``None`` when the update ran).
        cause: why it was rolled back or stopped
            (:class:`~stableopt.outcomes.Cause`), or the skip's :class:`SkipReason`;
            ``None`` when updated.
        clip_coefficient: the factor the gradients were multiplied by (``1.0``: unchanged).
        is_clipped: the gradients were scaled down.
        lr_factor: our LR multiplier after the step (1.0 = none).
    """

    step: int
    status: StepStatus
    reason: str | None = None
    skip_reason: SkipReason | None = None
    clip_coefficient: float = 1.0
    is_clipped: bool = False
    lr_factor: float = 1.0
    cause: AnyCause | None = None

    @property
    def was_skipped(self) -> bool:
        """The step's update is not in the weights (skipped, rolled back or stopped): what
        accelerate's ``step_was_skipped`` and a scheduler that counts updates ask."""
        return self.status != "updated"
