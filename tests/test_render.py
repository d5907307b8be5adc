"""The one place wording is checked: each kind of event rendered from its typed data.

Everything else in the suite asserts kinds, causes and numbers; these pin the sentences a
person reads, from data written out here (no training run).
"""

from __future__ import annotations

import math

import pytest

from stableopt.messages import divergence_text, event_text, skip_text, weights_text
from stableopt.outcomes import Cause, EventKind, SkipReason

SKIPS = [
    (
        SkipReason.NONFINITE_GRADS,
        {"grad_norm": math.nan, "loss": math.nan},
        {},
        "the loss is NaN/Inf (nan), and so are the gradients computed from it (gradient norm nan)",
    ),
    (
        SkipReason.NONFINITE_GRADS,
        {"grad_norm": math.inf, "loss": 0.5},
        {},
        "gradient norm is inf (NaN/Inf in the gradients)",
    ),
    (
        SkipReason.NONFINITE_LOSS,
        {"grad_norm": 0.5, "loss": math.inf},
        {},
        "the loss is NaN/Inf (inf) with finite gradients",
    ),
    (
        SkipReason.ABOVE_SKIP_LIMIT,
        {"grad_norm": 1521.0, "skip_above": 5.0},
        {},
        "gradient norm 1521 is above skip_above=5.0",
    ),
    (
        SkipReason.GRAD_NORM_SPIKE,
        {"grad_norm": 29060.0, "z": 37.6, "z_threshold": 12.0},
        {},
        "gradient-norm spike (2.906e+04, robust z = 37.6 > 12)",
    ),
    (
        SkipReason.LOSS_SPIKE,
        {"grad_norm": 1.0, "loss": 9963.0, "ratio": 23200.0, "history": 9, "early_ratio": 100.0},
        {},
        "loss spike (9963, 2.32e+04x the median of the first 9 values, > early_ratio=100)",
    ),
    (
        SkipReason.NORM_STATS_SPIKE,
        {"grad_norm": 0.2756, "growth": 9.03e10, "ratio": 1000.0},
        {"module": "1"},
        "running-statistics spike (the running variance of `1` grew 9.03e+10x in the forward "
        "pass: a batch far outside the data, its variance about 1000x the running one or more; "
        "gradient norm 0.2756)",
    ),
    (
        SkipReason.RULE,
        {"grad_norm": 2.0},
        {"rule": "loss_ceiling"},
        "skip rule 'loss_ceiling' (gradient norm 2)",
    ),
    (
        SkipReason.AMP_OVERFLOW,
        {"grad_norm": math.inf},
        {},
        "GradScaler found Inf/NaN gradients at its scale (its own skip)",
    ),
]


@pytest.mark.parametrize("cause, data, labels, text", SKIPS)
def test_skip_causes(cause: SkipReason, data: dict, labels: dict, text: str) -> None:
    assert skip_text(cause, data, labels) == text


EVENTS = [
    (
        EventKind.SKIP,
        SkipReason.NONFINITE_GRADS,
        {"grad_norm": math.nan, "reproduced": 1.0, "buffers": 1.0},
        {},
        "gradient norm is nan (NaN/Inf in the gradients) (reproducible: the re-run on the same "
        "batch and RNG state failed again: the data or the state, not the device): step "
        "skipped, weights, buffers and optimizer state unchanged",
    ),
    (
        EventKind.ROLLBACK,
        Cause.UPDATE_WROTE_NONFINITE,
        {"grad_norm": 0.3987, "snapshot_step": 203, "params": 1},
        {"scope": "entries"},
        "the update left non-finite weights (gradient norm 0.3987): the non-finite entries of 1 "
        "parameter(s) and of their state restored from the snapshot of step 203; every finite "
        "value kept",
    ),
    (
        EventKind.ROLLBACK,
        Cause.FAILED_STEPS,
        {"grad_norm": math.nan, "failures": 5, "snapshot_step": 16, "params": 6, "buffers": 1.0},
        {"failed_for": "nonfinite_grads", "scope": "all"},
        "gradient norm is nan (NaN/Inf in the gradients); 5 steps in a row failed: the state, "
        "not the inputs, is failing: weights, buffers and optimizer state restored to the "
        "snapshot of step 16",
    ),
    (
        EventKind.ROLLBACK,
        Cause.HOT_LR,
        {"snapshot_step": 0, "params": 4},
        {"scope": "all"},
        "the LR is too hot (the loss climbed: see the LR cut): weights and optimizer state "
        "restored to the snapshot of step 0",
    ),
    (
        EventKind.ROLLBACK,
        Cause.NONFINITE_BETWEEN_STEPS,
        {"grad_norm": 1.5, "snapshot_step": 10, "params": 2},
        {"scope": "corrupted"},
        "non-finite weights appeared between steps (no update wrote them) (gradient norm 1.5): "
        "2 parameter(s) and their state restored to the snapshot of step 10; every other "
        "parameter kept",
    ),
    (
        EventKind.LR_CUT,
        Cause.GRAD_NORM_THRESHOLD,
        {
            "grad_norm": 2000.0,
            "threshold": 1000.0,
            "triggers": 3,
            "trigger_window": 20,
            "old_factor": 1.0,
            "new_factor": 0.1,
        },
        {},
        "gradient norm 2000 above grad_norm_threshold=1000 (3 triggers within 20 steps): LR "
        "factor cut 1 -> 0.1",
    ),
    (
        EventKind.LR_CUT,
        Cause.HOT_LR,
        {
            "level": 8.2,
            "climb": 4.1,
            "reference": 2.0,
            "margin": 2.0,
            "patience": 8,
            "old_factor": 1.0,
            "new_factor": 0.03,
        },
        {},
        "the loss level 8.2 has stayed 4.1x above the level the run started from (2; margin "
        "2x) for 8 steps: the LR is too hot; LR factor cut 1 -> 0.03",
    ),
    (
        EventKind.LR_RECOVERY,
        Cause.HEALTHY_STEPS,
        {"healthy_steps": 35, "old_factor": 0.8, "new_factor": 1.0},
        {},
        "35 healthy steps: LR factor 0.8 -> 1 (recovered)",
    ),
    (
        EventKind.LR_RECOVERY,
        Cause.CALM_STEPS,
        {"calm_steps": 50, "ceiling": 0.5, "old_factor": 0.03, "new_factor": 0.06},
        {},
        "50 steps with the loss below the hot level: LR factor 0.03 -> 0.06 (at most 0.5, half "
        "the factor that failed)",
    ),
    (
        EventKind.PLATEAU,
        Cause.LOSS_PLATEAU,
        {
            "window": 100,
            "decrease": 0.001,
            "p": 0.3,
            "threshold": 0.01,
            "significance": 0.05,
            "old_factor": 1.0,
            "new_factor": 0.5,
        },
        {},
        "loss over the last 100 steps fell 0.10% (p=0.3); progress needs 1.00% at p<0.05: LR "
        "factor 1 -> 0.5",
    ),
    (
        EventKind.LR_CUT,
        Cause.POLICY,
        {"old_factor": 1.0, "new_factor": 0.5},
        {"policy": "halve"},
        "LR policy 'halve': LR factor 1 -> 0.5",
    ),
    (
        EventKind.NEW_LEVEL,
        Cause.SPIKES_AT_ONE_LEVEL,
        {"spikes": 3, "grad_norm": 120.0},
        {},
        "3 spikes in a row at one level: taken as the run's new level (histories restart from "
        "it): gradient norm now about 120",
    ),
    (
        EventKind.EMERGENCY_CLIP,
        Cause.ABOVE_EMERGENCY_THRESHOLD,
        {"grad_norm": 50.0, "clip_threshold": 2.5},
        {},
        "gradient norm 50 is above the emergency threshold: clipped to 2.5",
    ),
    (
        EventKind.DATA_FAULT,
        SkipReason.NONFINITE_GRADS,
        {"grad_norm": math.nan, "first_step": 3},
        {"batch": "16, 17"},
        "batch [16, 17] failed again (gradient norm is nan (NaN/Inf in the gradients); it "
        "failed first at step 3): a data fault, not the state: skipped without counting as a "
        "failure of the run (no rollback, no LR cut); leave its samples out "
        "(opt.ledger.bad_ids())",
    ),
    (
        EventKind.TRANSIENT_FAULT,
        Cause.RERUN_HEALTHY,
        {"first_grad_norm": math.nan, "grad_norm": 0.41},
        {"first_cause": "nonfinite_grads", "devices": "cpu"},
        "transient fault (possible silent data corruption) on cpu: the first evaluation of the "
        "step gave gradient norm is nan (NaN/Inf in the gradients); the re-run on the same "
        "batch and RNG state is healthy (gradient norm 0.41): the step goes on with the "
        "re-run's gradients",
    ),
    (
        EventKind.BUFFERS_RESTORED,
        Cause.SKIPPED_BATCH,
        {"modules": 10, "buffers": 30},
        {"module": "postnet.1", "kind": "BatchNorm running statistics"},
        "the BatchNorm running statistics of `postnet.1` and 9 more module(s) became NaN/Inf in "
        "the forward pass of the skipped batch: restored to their values before it (the model "
        "equals one that never saw the batch)",
    ),
    (
        EventKind.DIVERGENCE,
        Cause.BUDGET_SPENT,
        {"failures": 10, "max_failures": 10},
        {},
        "10 consecutive steps were skipped or rolled back (max_consecutive_failures=10)",
    ),
    (
        EventKind.DIVERGENCE,
        Cause.RESTORES_FAILED,
        {"failures": 5, "restores": 3, "max_restores": 3},
        {},
        "5 steps in a row failed: the state, not the inputs, is failing, and the restored "
        "state failed again right away 3 times in a row (max_restore_failures=3)",
    ),
    (
        EventKind.DIVERGENCE,
        Cause.UPDATE_WROTE_NONFINITE,
        {"grad_norm": 0.5},
        {},
        "the update left non-finite weights (gradient norm 0.5), and rollback is off: nothing "
        "good to restore",
    ),
    (
        EventKind.NONFINITE_LOSS,
        None,
        {"nonfinite_losses": 4, "since": 2},
        {},
        "the loss is NaN/Inf (4 non-finite losses so far, 2 since the last check; reported at "
        "the 1st, 2nd, 4th, ...)",
    ),
    (
        EventKind.SIZE_MISMATCH,
        None,
        {"dim": 2, "length": 97, "size_mismatches": 1},
        {"pred_shape": "(2, 80, 100)", "target_shape": "(2, 80, 97)"},
        "prediction (2, 80, 100) and target (2, 80, 97) differ in dim 2: both trimmed to 97 "
        "(1 mismatches so far; reported at the 1st, 2nd, 4th, 8th, ...)",
    ),
    (
        EventKind.CLIP,
        None,
        {"grad_norm": 1.201, "clip_threshold": 0.601, "clip_coefficient": 0.5},
        {},
        "gradient norm 1.201 above the clip threshold 0.601: scaled by 0.5",
    ),
]


@pytest.mark.parametrize("kind, cause, data, labels, text", EVENTS)
def test_events(kind: EventKind, cause: object, data: dict, labels: dict, text: str) -> None:
    assert event_text(kind, cause, data, labels) == text  # type: ignore[arg-type]


def test_every_kind_has_a_sentence() -> None:
    rendered = {kind for kind, *_ in EVENTS}
    assert rendered == set(EventKind)


def test_the_divergence_error_message() -> None:
    class E:
        step, kind, reason = 7, "skip", "gradient norm is nan"

    weights = weights_text(True, last_good=6)
    text = divergence_text("why", weights, {"steps": 7, "rollbacks": 1}, [E()])
    assert text == (
        "stableopt: why. The weights are those after the last good step (step 6). Counters: "
        "steps=7, rollbacks=1. Last events: step 7 skip: gradient norm is nan"
    )
    assert weights_text(True, 0, 7, 7) == (
        "The weights are those of the snapshot of step 0: 7 good update(s) after it were "
        "undone (the last good step was step 7)."
    )
    assert weights_text(False).startswith("The weights hold NaN/Inf values")
