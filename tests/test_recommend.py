"""Recommendations: each rule fires on a real run with the fault that should trigger it, a
healthy run gives none, and the numbers quoted are the run's own."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from stableopt import Monitor, PlateauLR, SafeOptimizer
from stableopt.loss import SafeLoss
from stableopt.monitor import Sink
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


def test_repeated_explosions_recommend_a_lower_lr_with_the_cut_that_worked() -> None:
    # updates that write NaN weights: each is rolled back and the LR cut (a bad input,
    # skipped, never cuts)
    opt = train(150, {50: "nan_weights", 100: "nan_weights"}, check_weights="every_step")
    advice = {a.kind: a for a in opt.recommendations()}
    lower = advice["lower_lr"]
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    deepest = min(e.data["new_factor"] for e in cuts)
    assert lower.evidence["lr_cuts"] == len(cuts) == 2
    assert lower.evidence["lr"] == LR == opt.param_groups[0]["lr"]
    assert lower.evidence["deepest_factor"] == pytest.approx(deepest)
    assert lower.evidence["cut_lr"] == pytest.approx(LR * deepest)
    assert lower.evidence["lr_factor"] == pytest.approx(opt.stats()["lr_factor"])
    assert f"{LR:.3g}" in lower.message and f"{LR * deepest:.3g}" in lower.message
    assert "steps 50, 100" in lower.message


def test_a_single_cut_is_not_repeated() -> None:
    opt = train(100, {50: "nan_weights"}, check_weights="every_step")
    assert "lower_lr" not in kinds(opt.recommendations())
    assert "lower_lr" in kinds(opt.recommendations(min_lr_cuts=1))


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
    assert "bf16" in advice.message and "GradScaler" in advice.message


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


def test_rollbacks_are_explained_with_the_steps_lost() -> None:
    opt = train(150, {120: "nan_weights"})
    rollback = {a.kind: a for a in opt.recommendations()}["rollback"]
    (event,) = [e for e in opt.events() if e.kind == "rollback"]
    assert rollback.evidence["rollbacks"] == opt.stats()["rollbacks"] == 1
    assert rollback.evidence["steps_lost"] == event.step - event.data["snapshot_step"]
    assert "eps" in rollback.message


def test_repeated_spikes_recommend_looking_at_the_batches() -> None:
    opt = train(120, {60: "poison_batch", 61: "poison_batch", 100: "poison_batch"})
    spikes = {a.kind: a for a in opt.recommendations()}["spikes"]
    assert spikes.evidence["spike_skips"] == opt.stats()["spike_skips"] >= 3
    assert "60, 61, 100" in spikes.message


def test_plateau_reductions_are_reported_with_the_effective_lr() -> None:
    plateau = PlateauLR(patience_steps=20, check_every_steps=10, cooldown_steps=10)
    opt = train(100, plateau=plateau)
    advice = {a.kind: a for a in opt.recommendations()}["plateau"]
    reductions = [e for e in opt.events() if e.kind == "plateau"]
    assert advice.evidence["plateau_reductions"] == len(reductions) >= 1
    assert advice.evidence["lr_factor"] == opt.stats()["lr_factor"] == 0.5 ** len(reductions)
    assert advice.evidence["effective_lr"] == pytest.approx(opt.effective_lr()[0])


def test_recommendation_reads_as_text() -> None:
    advice = Recommendation("rollback", "Something happened.", {"rollbacks": 1.0})
    assert str(advice) == "rollback: Something happened."
    assert (
        format_recommendations([advice, advice]) == "1. Something happened.\n2. Something happened."
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("min_lr_cuts", 0), ("clip_rate", 0.0), ("clip_rate", 1.5), ("min_good_steps", 0)],
)
def test_bad_thresholds_name_the_argument(name: str, value: float) -> None:
    thresholds: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=name):
        recommend({}, [], **thresholds)
