"""What happened, as data: the kinds of event and their causes.

A step's verdict names why it was skipped with a :class:`SkipReason`. Every intervention is an :class:`~stableopt.monitor.Event` whose ``kind`` is an
:class:`EventKind` and whose ``cause`` is a :class:`Cause` (or, for a skipped step, the
step's :class:`SkipReason`), with the numbers behind it in ``data`` and
names (module paths, batch ids, a rule's name) in ``labels``. Code that decides from an event
(the recommendations, the report) reads these; the sentence in ``Event.reason`` is rendered
from them once, by :mod:`stableopt.messages`, for people. Both enums are ``str`` enums: a
kind compares equal to its plain string (``event.kind == "skip"``) and is written as it in
JSON.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["AnyCause", "Cause", "EventKind", "SkipReason", "parse_cause"]


class SkipReason(str, Enum):
    """Why a step was skipped (its update did not run)."""

    #: GradScaler found Inf/NaN at its current scale: its own skip, not a failure of the run.
    AMP_OVERFLOW = "amp_overflow"
    #: NaN or Inf in the gradients (or a norm that overflows the dtype).
    NONFINITE_GRADS = "nonfinite_grads"
    #: The loss is NaN or Inf.
    NONFINITE_LOSS = "nonfinite_loss"
    #: The gradient norm is above ``EmergencyClip(skip_above=...)``.
    ABOVE_SKIP_LIMIT = "above_skip_limit"
    #: The loss is an outlier against the spike guard's window.
    LOSS_SPIKE = "loss_spike"
    #: The gradient norm is an outlier against the spike guard's window.
    GRAD_NORM_SPIKE = "grad_norm_spike"
    #: The forward pass moved a normalisation layer's running statistics far beyond what
    #: one batch of the data can (a batch far outside the data: :mod:`stableopt.buffers`).
    NORM_STATS_SPIKE = "norm_stats_spike"
    #: A skip rule of yours (``SafeOptimizer(skip_rules=...)``) put a bound the step crossed.
    RULE = "rule"
    #: DeepSpeed's ZeRO optimizer found Inf/NaN in the gradients (its overflow check, with or
    #: without a loss scale) and did not call the step: no update ran on any rank.
    ENGINE_OVERFLOW = "engine_overflow"


class EventKind(str, Enum):
    """What an event records."""

    #: A step's update did not run (its :class:`~stableopt.verdict.SkipReason` is the cause).
    SKIP = "skip"
    #: Weights, optimizer state (and buffers) went back to the last snapshot.
    ROLLBACK = "rollback"
    #: The run stopped with :class:`~stableopt.DivergenceError`.
    DIVERGENCE = "divergence"
    #: An LR factor went down (the emergency cut, the hot-LR cut, a policy of yours).
    LR_CUT = "lr_cut"
    #: An LR factor went back up.
    LR_RECOVERY = "lr_recovery"
    #: :class:`~stableopt.PlateauLR` lowered the LR.
    PLATEAU = "plateau"
    #: A run of spikes at one level was taken as the run's new level.
    NEW_LEVEL = "new_level"
    #: The gradient norm was above the emergency threshold: clipped harder.
    EMERGENCY_CLIP = "emergency_clip"
    #: A failing step was healthy when evaluated again (rerun triage).
    TRANSIENT_FAULT = "transient_fault"
    #: A tagged batch that failed before failed again.
    DATA_FAULT = "data_fault"
    #: A forward pass left NaN/Inf in the model's buffers: put back.
    BUFFERS_RESTORED = "buffers_restored"
    #: :class:`~stableopt.SafeLoss` saw a NaN/Inf loss.
    NONFINITE_LOSS = "nonfinite_loss"
    #: :class:`~stableopt.SafeLoss` trimmed a prediction/target length mismatch.
    SIZE_MISMATCH = "size_mismatch"
    #: A step's gradients were clipped (the demo lists them; clips are counted, not events).
    CLIP = "clip"


class Cause(str, Enum):
    """Why a rollback, an LR change, a new level, a stop or a restore of buffers happened."""

    #: The step's update wrote a NaN/Inf into the weights or the optimizer state.
    UPDATE_WROTE_NONFINITE = "update_wrote_nonfinite"
    #: A NaN/Inf appeared in the weights between steps (no update wrote it).
    NONFINITE_BETWEEN_STEPS = "nonfinite_between_steps"
    #: A NaN/Inf left by an earlier update, found later (``check_weights="lazy"``).
    NONFINITE_FOUND_LATE = "nonfinite_found_late"
    #: A NaN/Inf found in weights no update wrote, when taking a snapshot.
    NONFINITE_AT_SNAPSHOT = "nonfinite_at_snapshot"
    #: So many failed steps in a row that the state, not the inputs, is taken to fail.
    FAILED_STEPS = "failed_steps"
    #: The loss climbed and stayed far above where the run started.
    HOT_LR = "hot_lr"
    #: The gradient norm was above ``EmergencyLR(grad_norm_threshold=...)``.
    GRAD_NORM_THRESHOLD = "grad_norm_threshold"
    #: The loss was above ``EmergencyLR(loss_threshold=...)``.
    LOSS_THRESHOLD = "loss_threshold"
    #: ``max_consecutive_failures`` failed steps in a row.
    BUDGET_SPENT = "budget_spent"
    #: The restored state failed again right away, ``max_restore_failures`` times.
    RESTORES_FAILED = "restores_failed"
    #: A step must be undone and there is no snapshot (``rollback=None``).
    NOTHING_TO_RESTORE = "nothing_to_restore"
    #: Healthy steps since an emergency cut: the factor recovers.
    HEALTHY_STEPS = "healthy_steps"
    #: Steps with the loss below the hot level since a hot-LR cut: the factor recovers.
    CALM_STEPS = "calm_steps"
    #: The loss stopped improving (PlateauLR).
    LOSS_PLATEAU = "loss_plateau"
    #: A few spikes in a row at one level.
    SPIKES_AT_ONE_LEVEL = "spikes_at_one_level"
    #: The re-run of a failing step on the same batch and RNG state was healthy.
    RERUN_HEALTHY = "rerun_healthy"
    #: The gradient norm was above the emergency clip threshold.
    ABOVE_EMERGENCY_THRESHOLD = "above_emergency_threshold"
    #: The forward pass of a skipped batch wrote NaN/Inf into the buffers.
    SKIPPED_BATCH = "skipped_batch"
    #: The forward pass of an accepted step wrote NaN/Inf into buffers the loss left out.
    ACCEPTED_STEP = "accepted_step"
    #: An LR policy of yours (``SafeOptimizer(lr_policies=...)``) changed its factor.
    POLICY = "policy"


#: A cause an event can carry: a :class:`Cause`, or the :class:`SkipReason` of a skip.
AnyCause = Cause | SkipReason


def parse_cause(value: object) -> AnyCause | None:
    """The cause a run log wrote as ``value`` (its string), or ``None`` (absent, unknown)."""
    if isinstance(value, (Cause, SkipReason)):
        return value
    if not isinstance(value, str):
        return None
    for enum in (SkipReason, Cause):
        try:
            return enum(value)
        except ValueError:
            continue
    return None
