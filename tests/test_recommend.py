"""Recommendations: each rule fires on a real run with the fault that should trigger it, a
healthy run gives none, and the numbers quoted are the run's own."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from stableopt import EmergencyLR, Monitor, PlateauLR, Rollback, SafeOptimizer
from stableopt.loss import SafeLoss
from stableopt.monitor import Sink
from stableopt.outcomes import Cause
from stableopt.recommend import (
    Recommendation,
    format_recommendations,
    recommend,
)
from stableopt.testing.faults import FaultKind, FaultSchedule, RegressionTask, run_training

LR = 1e-2


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The MLP is tiny: intra-op threads cost more than they save on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(
    steps: int,
    faults: Mapping[int, FaultKind] | None = None,
    *,
    sinks: Iterable[Sink] = (),
    every_steps: int = 50,
    mismatch_steps: Iterable[int] = (),
    on_loss: Callable[[float], None] | None = None,
    loss_factor: Callable[[int], float] | None = None,
    **options: Any,
) -> SafeOptimizer:
    """Train the fault-injection MLP with SafeOptimizer(AdamW) under ``faults``; close the sinks.

    The loss is SafeLoss(MSELoss), which hands it to the optimizer (so the loss-spike
    guard and plateau scheduling see it) and counts non-finite losses. At
    ``mismatch_steps`` the targets come with a second column (a sequence one step
    longer than the prediction), which SafeLoss trims and counts in
    ``size_mismatches``. ``on_loss`` gets each step's loss.
    """
    task = RegressionTask(seed=0)
    model = task.make_model()
    monitor = Monitor(sinks=sinks, every_steps=every_steps)
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), monitor=monitor, **options)
    safe_loss = SafeLoss(nn.MSELoss(), optimizer=opt)
    mismatches = set(mismatch_steps)

    def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
        if opt.monitor.counters["steps"] + 1 in mismatches:
            target = torch.cat([target, target], dim=1)
        if loss_factor is not None and torch.is_grad_enabled():
            # the training loss x factor (both sides x sqrt(factor): the MSE scales by it)
            root = loss_factor(opt.monitor.counters["steps"] + 1) ** 0.5
            prediction, target = prediction * root, target * root
        loss = safe_loss(prediction, target)
        if on_loss is not None:
            on_loss(float(loss.detach()))
        return loss

    result = run_training(model, opt, task, steps, FaultSchedule(faults or {}), loss_fn=loss_fn)
    assert result.error is None, result.error
    monitor.close()
    return opt


def kinds(advice: list[Recommendation]) -> set[str]:
    return {a.kind for a in advice}


def test_healthy_run_gives_no_recommendation() -> None:
    opt = train(200)
    assert opt.stats()["skipped_steps"] == 0  # the premise: nothing fired
    assert opt.recommendations() == []
    assert format_recommendations([]).startswith("No recommendations")


def test_repeated_corrupting_updates_recommend_a_lower_lr_with_the_cut_that_worked() -> None:
    # updates that write NaN weights: each is rolled back; the second within 20 steps cuts
    # the LR (a bad input, skipped, never cuts)
    faults: dict[int, FaultKind] = {s: "nan_weights" for s in (50, 55, 100, 105)}
    opt = train(150, faults, check_weights="every_step")
    advice = {a.kind: a for a in opt.recommendations()}
    lower = advice["lower_lr"]
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    rollbacks = [e for e in opt.events() if e.kind == "rollback"]
    deepest = min(e.data["new_factor"] for e in cuts)
    assert lower.evidence["lr_cuts"] == len(cuts) == 2
    # every cut came with a rollback for non-finite weights, the second of each pair
    assert [e.step for e in rollbacks] == [50, 55, 100, 105]
    assert [e.step for e in cuts] == [55, 105]
    assert lower.evidence["weight_cuts"] == 2
    assert lower.evidence["failure_cuts"] == lower.evidence["threshold_cuts"] == 0
    assert lower.evidence["lr"] == LR == opt.param_groups[0]["lr"]
    assert lower.evidence["deepest_factor"] == pytest.approx(deepest)
    assert lower.evidence["cut_lr"] == pytest.approx(LR * deepest)
    assert lower.evidence["lr_factor"] == pytest.approx(opt.stats()["lr_factor"])
    assert f"{LR:.3g}" in lower.message and f"{LR * deepest:.3g}" in lower.message
    assert "steps 55, 105: 2 after an update wrote non-finite weights" in lower.message
    assert "see rollback" in lower.message and "exploding" not in lower.message


def test_a_single_cut_is_not_repeated() -> None:
    opt = train(100, {50: "nan_weights", 55: "nan_weights"}, check_weights="every_step")
    assert [e.step for e in opt.events() if e.kind == "lr_cut"] == [55]
    assert "lower_lr" not in kinds(opt.recommendations())
    assert "lower_lr" in kinds(opt.recommendations(min_lr_cuts=1))


def test_cuts_at_an_absolute_threshold_point_at_the_threshold() -> None:
    # a gradient-norm threshold below this run's healthy norm (about 0.3): every step triggers
    threshold = 0.05
    opt = train(80, emergency_lr=EmergencyLR(grad_norm_threshold=threshold))
    lower = {a.kind: a for a in opt.recommendations()}["lower_lr"]
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    assert all(f"grad_norm_threshold={threshold:g}" in e.reason for e in cuts)
    assert lower.evidence["threshold_cuts"] == lower.evidence["lr_cuts"] == len(cuts) >= 2
    assert lower.evidence["weight_cuts"] == lower.evidence["failure_cuts"] == 0
    assert opt.stats()["rollbacks"] == 0  # nothing went wrong but the threshold
    assert f"{len(cuts)} at grad_norm_threshold" in lower.message
    assert "too low for this run" in lower.message and "see rollback" not in lower.message


def test_clipping_most_steps_recommends_checking_the_model() -> None:
    opt = train(60, clip=0.01)  # a threshold far below the MLP's gradient norms
    stats = opt.stats()
    clipping = {a.kind: a for a in opt.recommendations()}["clipping"]
    assert clipping.evidence["total_clips"] == stats["total_clips"] == 60
    assert clipping.evidence["clip_rate"] == pytest.approx(
        stats["total_clips"] / stats["good_steps"]
    )
    assert clipping.evidence["clip_threshold"] == pytest.approx(0.01)
    assert "100%" in clipping.message and "initialisation" in clipping.message


def test_non_finite_values_recommend_checking_the_data() -> None:
    opt = train(120, {50: "nan_grad", 90: "inf_loss"})
    advice = {a.kind: a for a in opt.recommendations()}["non_finite"]
    assert advice.evidence["non_finite_skips"] == 2
    assert advice.evidence["nonfinite_losses"] == opt.stats()["nonfinite_losses"] == 1
    assert advice.evidence["skipped_steps"] == opt.stats()["skipped_steps"]
    assert "steps 50, 90" in advice.message and "1 non-finite loss" in advice.message
    assert "the LR were left as they were" in advice.message
    assert opt.stats()["lr_changes"] == 0  # as the message says
    assert "bf16" in advice.message and "GradScaler" in advice.message


def test_a_run_of_non_finite_batches_counts_the_step_that_was_rolled_back() -> None:
    opt = train(120, {step: "nan_grad" for step in range(60, 65)})
    rollback_after = opt.escalation.rollback_after
    assert rollback_after == 5 and opt.stats()["rollbacks"] == 1  # the premise
    advice = {a.kind: a for a in opt.recommendations()}["non_finite"]
    assert advice.evidence["non_finite_skips"] == opt.stats()["skipped_steps"] == 5
    assert "steps 60, 61, 62, 63, 64" in advice.message
    assert f"{rollback_after} failed steps in a row also restored" in advice.message


def test_nan_losses_from_weights_an_update_corrupted_are_not_blamed_on_the_data() -> None:
    # lazy weight check: the NaN weights make the next loss NaN, and that step is rolled back
    opt = train(150, {120: "nan_weights"}, check_weights="lazy")
    (rollback,) = [e for e in opt.events() if e.kind == "rollback"]
    assert rollback.cause is Cause.NONFINITE_FOUND_LATE
    assert opt.stats()["nonfinite_losses"] == 1 and opt.stats()["skipped_steps"] == 0
    assert kinds(opt.recommendations()) == {"rollback"}


def test_non_finite_evaluation_losses_point_at_the_evaluation() -> None:
    opt = train(40)
    evaluate = SafeLoss(nn.MSELoss(), optimizer=opt)
    with torch.no_grad():  # an evaluation loss: counted, not given to the optimizer
        evaluate(torch.zeros(4, 1), torch.full((4, 1), math.nan))
    assert evaluate.stats()["nonfinite_losses"] == 1
    advice = {a.kind: a for a in opt.recommendations()}["non_finite"]
    assert advice.evidence["nonfinite_losses"] == opt.stats()["nonfinite_losses"] == 1
    assert advice.evidence["non_finite_skips"] == opt.stats()["skipped_steps"] == 0
    assert "SafeLoss saw 1 non-finite loss(es) that no training step" in advice.message
    assert "torch.no_grad()" in advice.message


def test_size_mismatches_recommend_checking_the_input_pipeline() -> None:
    opt = train(60, mismatch_steps=[10, 20, 30])
    assert opt.stats()["size_mismatches"] == 3  # counted by SafeLoss
    advice = opt.recommendations()
    assert kinds(advice) == {"size_mismatch"}
    assert advice[0].evidence == {"size_mismatches": 3.0, "steps": 60.0}
    assert "input pipeline" in advice[0].message


def test_no_size_mismatch_counter_is_no_mismatch() -> None:
    stats = {"steps": 10, "good_steps": 10}  # SafeLoss absent: the counter does not exist
    assert recommend(stats, []) == []


def test_an_entry_wise_restore_is_reported_as_what_it_restored() -> None:
    """The default rollback puts back the NaN entries only: nothing of the training is
    undone, and the advice says so (it used to count the steps since the snapshot)."""
    opt = train(150, {120: "nan_weights"})
    rollback = {a.kind: a for a in opt.recommendations()}["rollback"]
    (event,) = [e for e in opt.events() if e.kind == "rollback"]
    assert event.labels["scope"] == "entries" and event.data["entries"] >= 1
    assert rollback.evidence["rollbacks"] == opt.stats()["rollbacks"] == 1
    assert rollback.evidence["weight_rollbacks"] == rollback.evidence["entry_restores"] == 1
    assert rollback.evidence["failure_rollbacks"] == rollback.evidence["full_restores"] == 0
    assert rollback.evidence["entries_restored"] == event.data["entries"]
    assert "steps_lost" not in rollback.evidence


def test_a_full_restore_counts_the_steps_it_undid() -> None:
    opt = train(150, {120: "nan_weights"}, rollback=Rollback(scope="all"))
    rollback = {a.kind: a for a in opt.recommendations()}["rollback"]
    (event,) = [e for e in opt.events() if e.kind == "rollback"]
    assert event.labels["scope"] == "all"
    assert rollback.evidence["full_restores"] == 1
    assert rollback.evidence["steps_lost"] == event.step - event.data["snapshot_step"]


def test_a_rollback_after_a_run_of_failed_steps_names_that_run_not_the_weights() -> None:
    opt = train(120, {step: "nan_grad" for step in range(60, 65)})
    rollback = {a.kind: a for a in opt.recommendations()}["rollback"]
    (event,) = [e for e in opt.events() if e.kind == "rollback"]
    n = opt.escalation.rollback_after
    assert event.step == 60 + n - 1  # the premise: the n-th failed step in a row
    assert rollback.evidence["rollbacks"] == opt.stats()["rollbacks"] == 1
    assert rollback.evidence["failure_rollbacks"] == 1
    assert rollback.evidence["weight_rollbacks"] == 0
    assert rollback.evidence["steps_lost"] == event.step - event.data["snapshot_step"]
    assert f"1 after {n} failed steps in a row (steps {event.step}" in rollback.message
    assert "the last failed for: gradient norm is nan" in rollback.message
    assert "non-finite weights" not in rollback.message and "an eps" not in rollback.message


def test_restores_that_fail_again_count_each_undone_step_once() -> None:
    # an update that writes NaN weights on every step from 60 on: each restore fails again
    task = RegressionTask(seed=0)
    model = task.make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), check_weights="every_step")
    faults = FaultSchedule(dict.fromkeys(range(60, 101), "nan_weights"))
    error = run_training(model, opt, task, 100, faults).error
    assert error is not None and "max_restore_failures" in str(error)
    rollbacks = [e for e in error.events if e.kind == "rollback"]
    assert [e.step for e in rollbacks] == list(range(60, 60 + len(rollbacks)))
    assert {e.data["snapshot_step"] for e in rollbacks} == {0.0}
    rollback = {a.kind: a for a in recommend(error.stats, error.events)}["rollback"]
    # the first restore undid the steps since the snapshot, each later one its own step
    assert rollback.evidence["steps_lost"] == 60 + len(rollbacks) - 1
    assert rollback.evidence["rollbacks"] == error.stats["rollbacks"] == len(rollbacks)
    assert rollback.evidence["weight_rollbacks"] == len(rollbacks)


def test_repeated_spikes_recommend_looking_at_the_batches() -> None:
    faults: dict[int, FaultKind] = {60: "poison_batch", 61: "poison_batch", 100: "poison_batch"}
    opt = train(120, faults)
    spikes = {a.kind: a for a in opt.recommendations()}["spikes"]
    assert spikes.evidence["spike_skips"] == opt.stats()["spike_skips"] == len(faults)
    assert spikes.evidence["level_spikes"] == opt.stats()["new_levels"] == 0
    # alone between healthy steps: the faulted steps with no faulted neighbour; the run never
    # reached their loss again: the evidence of a bad batch
    alone = [s for s in faults if s - 1 not in faults and s + 1 not in faults]
    assert spikes.evidence["isolated_spikes"] == len(alone) == 1
    assert spikes.evidence["bad_batch_spikes"] == 1 and spikes.evidence["reached_spikes"] == 0
    assert spikes.evidence["steps"] / spikes.evidence["other_spikes"] == 40  # 1 in 40 steps


def test_frequent_isolated_spikes_are_called_bad_batches() -> None:
    faults: dict[int, FaultKind] = {step: "poison_batch" for step in range(40, 200, 10)}
    opt = train(200, faults)
    spikes = {a.kind: a for a in opt.recommendations()}["spikes"]
    assert spikes.evidence["spike_skips"] == opt.stats()["spike_skips"] == len(faults) == 16
    assert spikes.evidence["isolated_spikes"] == spikes.evidence["other_spikes"] == 16
    assert spikes.evidence["bad_batch_spikes"] == 16
    assert "new_level" not in kinds(opt.recommendations())


def test_spikes_at_a_level_the_run_then_reached_are_not_blamed_on_the_data() -> None:
    """The loss x30 on three batches early, and from step 100 on the run's loss at that
    height (a re-weighted stage): the three early spikes were the run's level seen early,
    not bad batches: the advice does not point at their batches."""
    faults = {40: 30.0, 55: 30.0, 70: 30.0}
    opt = train(120, loss_factor=lambda step: faults.get(step, 30.0 if step > 100 else 1.0))
    advice = {a.kind: a for a in opt.recommendations()}
    spikes = advice["spikes"]
    assert spikes.evidence["isolated_spikes"] == spikes.evidence["reached_spikes"] == 3
    assert spikes.evidence["bad_batch_spikes"] == 0
    assert advice["new_level"].evidence["lasted"] == 1.0


def test_a_lasting_new_level_is_a_change_of_the_training_not_the_data() -> None:
    # from step 60 on every batch is of another scale: a new level, not bad batches
    opt = train(150, {step: "poison_batch" for step in range(60, 151)})
    n = opt.escalation.relearn_after
    advice = {a.kind: a for a in opt.recommendations()}
    assert "spikes" not in advice  # the spikes were the first steps at the new level
    level = advice["new_level"]
    (event,) = [e for e in opt.events() if e.kind == "new_level"]
    skipped = [e.step for e in opt.events() if e.kind == "skip"]
    assert skipped == list(range(60, 60 + n)) and event.step == 60 + n - 1
    assert level.evidence["new_levels"] == opt.stats()["new_levels"] == 1
    assert level.evidence["level_step"] == event.step
    assert level.evidence["level_grad_norm"] == event.data["grad_norm"]
    assert level.evidence["ratio_to_level"] == pytest.approx(
        opt.stats()["grad_norm"] / event.data["grad_norm"]
    )
    assert level.evidence["lasted"] == 1.0


def test_a_new_level_that_did_not_last_is_called_a_burst() -> None:
    # a burst of exploding gradients, exactly long enough to be taken as a level (clipping
    # off: with it on, a gradient-norm spike is clipped, not skipped)
    opt = train(150, {step: "grad_spike" for step in range(60, 63)}, clip=None)
    level = {a.kind: a for a in opt.recommendations()}["new_level"]
    (event,) = [e for e in opt.events() if e.kind == "new_level"]
    ratio = opt.stats()["grad_norm"] / event.data["grad_norm"]
    assert ratio < 0.1  # the premise: the norm went back to its old level
    assert level.evidence["ratio_to_level"] == pytest.approx(ratio)
    assert level.evidence["level_step"] == event.step == 62 and level.evidence["lasted"] == 0.0


def test_spikes_and_a_new_level_are_told_apart() -> None:
    faults: dict[int, FaultKind] = {step: "poison_batch" for step in range(40, 100, 15)}
    faults |= {step: "grad_spike" for step in range(120, 123)}
    opt = train(200, faults, clip=None)
    n = opt.escalation.relearn_after
    advice = {a.kind: a for a in opt.recommendations()}
    assert opt.stats()["spike_skips"] == len(faults) and opt.stats()["new_levels"] == 1
    spikes = advice["spikes"]
    assert spikes.evidence["level_spikes"] == n
    assert spikes.evidence["other_spikes"] == spikes.evidence["isolated_spikes"] == len(faults) - n
    assert "new_level" in advice


def test_plateau_reductions_are_reported_with_the_effective_lr() -> None:
    plateau = PlateauLR(patience_steps=20, check_every_steps=10, cooldown_steps=10)
    opt = train(100, plateau=plateau)
    advice = {a.kind: a for a in opt.recommendations()}["plateau"]
    reductions = [e for e in opt.events() if e.kind == "plateau"]
    assert advice.evidence["plateau_reductions"] == len(reductions) >= 1
    assert advice.evidence["lr_factor"] == opt.stats()["lr_factor"] == 0.5 ** len(reductions)
    assert advice.evidence["effective_lr"] == pytest.approx(opt.effective_lr()[0])


def test_a_flat_loss_gives_no_plateau_advice_by_default() -> None:
    opt = train(100)  # the run above, PlateauLR left at its default (off)
    assert opt.plateau is None
    assert [e for e in opt.events() if e.kind == "plateau"] == []
    assert "plateau" not in kinds(opt.recommendations())


def test_recommendation_reads_as_text() -> None:
    advice = Recommendation("rollback", "Something happened.", {"rollbacks": 1.0})
    assert str(advice) == "rollback: Something happened."
    assert (
        format_recommendations([advice, advice]) == "1. Something happened.\n2. Something happened."
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("min_lr_cuts", 0),
        ("clip_rate", 0.0),
        ("clip_rate", 1.5),
        ("min_good_steps", 0),
        ("min_spike_skips", 0),
        ("level_ratio", 1.0),
    ],
)
def test_bad_thresholds_name_the_argument(name: str, value: float) -> None:
    thresholds: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=name):
        recommend({}, [], **thresholds)
