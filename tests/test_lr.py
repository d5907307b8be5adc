"""LR control: emergency cuts and recovery, plateau reductions, composition with LR schedulers.

The LR an update really uses is read by a SPY: a step pre-hook on the *inner*
optimizer records ``group["lr"]`` at the moment its update runs. It is compared
with a bare optimizer driven by the same scheduler (the scheduled LR) times the
factor expected from the constructor arguments or from the recorded events.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from torch import nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from stableopt import DivergenceError, EmergencyLR, PlateauLR, Rollback, SafeOptimizer, SpikeGuard
from stableopt.outcomes import Cause
from stableopt.stages.emergency_lr import Trigger
from stableopt.stages.lr_factor import effective_lr
from tests.helpers import backward, batch, make_model, scale_grads, set_first_grad, twin

# Every test runs with the step decided on the host and on the device (conftest.py).
pytestmark = pytest.mark.usefixtures("decide_on")

#: A trigger for EmergencyLR.update: an absolute threshold crossed.
NAN_TRIGGER = Trigger(Cause.GRAD_NORM_THRESHOLD, {"grad_norm": 2000.0, "threshold": 1000.0})


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="stableopt")


def spy_lrs(opt: SafeOptimizer) -> dict[int, float]:
    """``{step: lr of the first group when the inner update ran}`` (steps counted from 1)."""
    seen: dict[int, float] = {}

    def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        seen[opt.monitor.counters["steps"]] = float(optimizer.param_groups[0]["lr"])

    opt.optimizer.register_step_pre_hook(hook)
    return seen


def expected_emergency_factor(
    step: int, cut_step: int, cut: float, after: int, every: int, growth: float
) -> float:
    """The factor in force during ``step`` after one cut at ``cut_step``, from the
    documented rule: after ``after`` healthy steps multiply by ``growth``, then again
    every ``every`` healthy steps, up to 1."""
    if step <= cut_step:
        return 1.0
    healthy = step - 1 - cut_step  # healthy steps completed before this one
    increments = 0 if healthy < after else 1 + (healthy - after) // every
    factor = cut
    for _ in range(increments):
        factor = min(1.0, factor * growth)
    return factor


def recovered_at(cut_step: int, cut: float, after: int, every: int, growth: float) -> int:
    """The step whose end brings the factor back to 1."""
    increments = math.ceil(math.log(1.0 / cut) / math.log(growth) - 1e-12)
    return cut_step + after + (increments - 1) * every


# The cut and recovery arithmetic under test; the trigger is an update that leaves
# non-finite weights (rolled back, and cut at once with weight_faults=1).
EMERGENCY_CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "custom": {
        "factor": 0.25,
        "recovery_after_steps": 7,
        "recovery_every_steps": 3,
        "recovery_growth": 3.0,
    },
}


def decaying(step: int) -> float:
    return 1.0 / (1.0 + 0.01 * step)


# ---------------------------------------------------------------------------------
# emergency cuts and recovery


@pytest.mark.parametrize("via", ["observe_loss", "closure"])
@pytest.mark.parametrize("config", list(EMERGENCY_CONFIGS))
def test_nan_loss_cuts_then_recovers_geometrically(config: str, via: str) -> None:
    kwargs = EMERGENCY_CONFIGS[config]
    policy = EmergencyLR(**kwargs)
    cut, after = policy.cut_factor, policy.recovery_after_steps
    every, growth = policy.recovery_every_steps, policy.recovery_growth
    bad_step, steps = 10, 70
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        spike=None,
        plateau=None,
        emergency_lr=policy,
        rollback=Rollback(every_steps=2),
        check_weights="every_step",
    )
    corrupt_weights_hook(model, bad_step, opt)
    sched = lrs.LambdaLR(opt, decaying)
    used = spy_lrs(opt)
    scheduled, factors, modes = {}, {}, {}
    for step in range(1, steps + 1):
        x, y = batch(step)
        scheduled[step] = opt.param_groups[0]["lr"]
        assert opt.effective_lr()[0] == scheduled[step] * opt.stats()["lr_factor"]

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> Any:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if via == "closure":
            opt.step(closure)
        else:
            loss = closure()
            opt.observe_loss(loss.detach())
            opt.step()
        sched.step()
        factors[step] = opt.stats()["lr_factor"]
        modes[step] = opt.stats()["emergency_mode"]

    for step in range(1, steps + 1):
        expected = expected_emergency_factor(step, bad_step, cut, after, every, growth)
        assert used[step] == scheduled[step] * expected, step  # (bad_step's was undone)
        if bad_step < step <= bad_step + after:
            assert used[step] < 0.5 * scheduled[step]
    done = recovered_at(bad_step, cut, after, every, growth)
    assert done == (bad_step + 35 if config == "defaults" else bad_step + 7 + 3)
    assert all(modes[s] == (bad_step <= s < done) for s in modes)
    assert factors[done - 1] < 1.0 and factors[done] == 1.0
    events = [e for e in opt.events() if e.kind in ("lr_cut", "lr_recovery")]
    assert events[0].step == bad_step and events[0].kind == "lr_cut"
    assert events[0].cause is Cause.UPDATE_WROTE_NONFINITE
    assert (events[0].data["old_factor"], events[0].data["new_factor"]) == (1.0, cut)
    assert events[-1].step == done and events[-1].cause is Cause.HEALTHY_STEPS
    assert events[-1].data["new_factor"] == 1.0
    # every change is counted and is an event whose numbers chain
    assert opt.stats()["lr_changes"] == len(events)
    for prev, nxt in zip(events, events[1:]):
        assert nxt.data["old_factor"] == prev.data["new_factor"]
        assert nxt.data["new_factor"] == min(1.0, prev.data["new_factor"] * growth)


def test_a_cut_under_lambdalr_is_not_erased_by_the_next_scheduler_step() -> None:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        spike=None,
        plateau=None,
        check_weights="every_step",
    )
    corrupt_weights_hook(model, 3, opt)
    reference = torch.optim.SGD(twin(model).parameters(), lr=0.05)
    sched, ref_sched = lrs.LambdaLR(opt, decaying), lrs.LambdaLR(reference, decaying)
    used = spy_lrs(opt)
    for step in range(1, 8):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        opt.step()
        reference.step()
        sched.step()
        ref_sched.step()
        # the schedule is never overwritten ...
        assert opt.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        # ... nor does it overwrite the cut
        if step >= 3:
            assert opt.effective_lr()[0] == reference.param_groups[0]["lr"] * 0.1
    assert used[4] == 0.05 * decaying(3) * 0.1
    assert used[7] == 0.05 * decaying(6) * 0.1


def corrupt_weights_hook(
    model: nn.Module, at: int | set[int], opt: SafeOptimizer, cut_each: bool = True
) -> None:
    """The inner update of step ``at`` (or of each step in it) writes a NaN into a weight.

    ``cut_each``: every such update cuts (``EmergencyLR(weight_faults=1)``; by default only
    the second within the trigger window does), so that the tests that use it as their
    trigger test the cut and recovery arithmetic."""
    steps = {at} if isinstance(at, int) else at
    if cut_each and opt.emergency_lr is not None:
        opt.emergency_lr.weight_faults = 1

    def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if opt.monitor.counters["steps"] in steps:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan

    opt.optimizer.register_step_post_hook(hook)


TRIGGERS = ["nan_weights", "grad_norm_threshold", "loss_threshold"]
BAD_INPUTS = ["nan_loss", "inf_grad", "huge_grad", "huge_loss"]


def run_one_fault(fault: str) -> SafeOptimizer:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        # the absolute thresholds are explicit options (off by default)
        emergency_lr=EmergencyLR(min_triggers=1, grad_norm_threshold=1000.0, loss_threshold=1e6)
        if fault in ("grad_norm_threshold", "loss_threshold")
        else "default",
        spike=None,
        plateau=None,
        rollback=Rollback(every_steps=2),
        check_weights="every_step",  # lazily, the NaN weights would be found at step 12
    )
    if fault == "nan_weights":
        corrupt_weights_hook(model, 11, opt)
    for step in range(1, 15):
        opt.zero_grad()
        loss = backward(model, step)
        if step == 11:
            if fault == "nan_loss":
                loss = loss * math.nan
            elif fault == "inf_grad":
                set_first_grad(model, math.inf)
            elif fault in ("grad_norm_threshold", "huge_grad"):
                scale_grads(model, 1e5)
            elif fault in ("loss_threshold", "huge_loss"):
                loss = torch.tensor(2e6)
        opt.observe_loss(loss)
        opt.step()
    return opt


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_every_trigger_cuts_once(trigger: str) -> None:
    opt = run_one_fault(trigger)
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    assert [e.step for e in cuts] == [11]
    causes = {
        "nan_weights": Cause.UPDATE_WROTE_NONFINITE,
        "grad_norm_threshold": Cause.GRAD_NORM_THRESHOLD,
        "loss_threshold": Cause.LOSS_THRESHOLD,
    }
    assert cuts[0].cause is causes[trigger]
    if trigger != "nan_weights":
        assert (
            cuts[0].data["threshold"]
            == {"grad_norm_threshold": 1000, "loss_threshold": 1e6}[trigger]
        )
    stats = opt.stats()
    assert stats["lr_factor"] == 0.1 and stats["emergency_mode"] and stats["lr_changes"] == 1


@pytest.mark.parametrize("fault", BAD_INPUTS)
def test_a_bad_input_never_cuts_by_default(fault: str) -> None:
    """A NaN/Inf loss or gradient is skipped; a huge finite one is clipped (no spike guard
    here): neither touched the state in a way that says the LR is too high."""
    opt = run_one_fault(fault)
    assert opt.stats()["lr_changes"] == 0 and opt.stats()["lr_factor"] == 1.0
    assert opt.stats()["rollbacks"] == 0


def run_with_corruptions(
    policy: EmergencyLR, bad_steps: set[int], steps: int, lr: float = 0.05, **options: Any
) -> tuple[SafeOptimizer, dict[int, float]]:
    """Updates that write NaN into a weight at ``bad_steps``: each rolled back and cut."""
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        spike=None,
        plateau=None,
        emergency_lr=policy,
        rollback=Rollback(every_steps=1),
        check_weights="every_step",
        **options,
    )
    corrupt_weights_hook(model, bad_steps, opt)
    used = spy_lrs(opt)
    for step in range(1, steps + 1):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        opt.step()
    return opt, used


def run_with_nan_losses(
    policy: EmergencyLR, nan_steps: set[int], steps: int, lr: float = 0.05
) -> tuple[SafeOptimizer, dict[int, float]]:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        spike=None,
        plateau=None,
        emergency_lr=policy,
        max_consecutive_failures=100,
    )
    used = spy_lrs(opt)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = backward(model, step)
        opt.observe_loss(math.nan if step in nan_steps else loss)
        opt.step()
    return opt, used


def lr_cuts(opt: SafeOptimizer) -> list[tuple[int, float, float]]:
    return [
        (e.step, e.data["old_factor"], e.data["new_factor"])
        for e in opt.events()
        if e.kind == "lr_cut"
    ]


def test_a_new_emergency_during_recovery_cuts_from_where_it_is() -> None:
    opt, used = run_with_corruptions(EmergencyLR(), {5, 27}, 30)
    # after 20 healthy steps (step 25) 0.1 -> 0.2; the corruption at 27 cuts 0.2 -> 0.02
    assert lr_cuts(opt) == [(5, 1.0, 0.1), (27, 0.2, 0.2 * 0.1)]
    assert used[28] == 0.05 * (0.2 * 0.1)


def test_triggers_within_the_cooldown_do_not_cut_again_but_restart_the_clock() -> None:
    opt, _ = run_with_corruptions(EmergencyLR(cooldown_steps=10), {5, 15, 16}, 40)
    assert lr_cuts(opt) == [(5, 1.0, 0.1), (16, 0.1, 0.1 * 0.1)]  # 15 - 5 <= 10: no cut
    opt, _ = run_with_corruptions(EmergencyLR(cooldown_steps=10), {5, 12}, 40)
    assert lr_cuts(opt) == [(5, 1.0, 0.1)]
    recovery = [e.step for e in opt.events() if e.kind == "lr_recovery"]
    assert recovery[0] == 12 + 20  # the clock restarted at the unhealthy step 12


def test_an_unhealthy_step_without_a_trigger_restarts_the_recovery_clock() -> None:
    policy = EmergencyLR(min_triggers=1, recovery_after_steps=3, recovery_every_steps=1)
    assert policy.update(1, NAN_TRIGGER) is not None and policy.factor == 0.1
    for step in (2, 3):
        assert policy.update(step, None) is None
    assert policy.update(4, None, is_healthy=False) is None  # e.g. a skipped spike
    assert policy.factor == 0.1 and policy.healthy_steps == 0
    changes = [policy.update(step, None) for step in range(5, 9)]
    assert [c is not None for c in changes] == [False, False, True, True]  # 3 healthy: 7


def test_skipped_spikes_during_recovery_are_not_healthy_steps() -> None:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        spike=SpikeGuard(window_steps=16, min_history=8),
        plateau=None,
        check_weights="every_step",
    )
    corrupt_weights_hook(model, 40, opt)
    for step in range(1, 80):
        opt.zero_grad()
        loss = backward(model, step)
        if step in (44, 45):  # two spike skips: fewer than a new level needs
            scale_grads(model, 1e5)
        opt.observe_loss(loss)
        opt.step()
    assert [e.step for e in opt.events() if e.kind in ("skip", "rollback")] == [40, 44, 45]
    assert next(e.step for e in opt.events() if e.kind == "lr_recovery") == 45 + 20


def test_min_lr_floors_the_effective_lr() -> None:
    opt, used = run_with_corruptions(EmergencyLR(min_lr=0.004, cooldown_steps=0), {3, 5}, 6)
    assert lr_cuts(opt) == [(3, 1.0, 0.1), (5, 0.1, 0.1 * 0.1)]
    assert used[4] == 0.05 * 0.1 and used[6] == 0.004  # 0.005, then 0.0005 -> the floor
    # the floor never raises a schedule that is itself below it
    assert effective_lr(0.001, 0.01, 0.004, None) == 0.001
    assert effective_lr(0.1, 0.01, 0.004, None) == 0.004
    assert effective_lr(0.1, 1.0, 0.0, 0.03) == 0.03
    assert float(effective_lr(torch.tensor(0.1), 0.01, 0.004, 0.05)) == pytest.approx(0.004)


def test_restored_states_that_fail_again_right_away_stop_the_run() -> None:
    """Every restored state's next updates corrupt the weights again: the third restore in a
    row that fails before the run recovered raises, naming what it saw."""
    with pytest.raises(DivergenceError) as caught:
        run_with_corruptions(EmergencyLR(cooldown_steps=0), {5, 8, 11, 14}, 20)
    error = caught.value
    # three restores that failed again, and the one that stops with the last good weights
    assert error.stats["steps"] == 14 and error.stats["rollbacks"] == 4
    assert "the restored state failed again right away 3 times in a row" in str(error)
    assert "the weights are not finite" in str(error)
    assert [e.kind for e in error.events][-1] == "divergence"


def test_the_factor_stops_at_max_cuts_without_stopping_the_run() -> None:
    opt, _ = run_with_corruptions(EmergencyLR(max_cuts=2, cooldown_steps=0), {3, 30, 33}, 40)
    # 3: 1 -> 0.1; 30 (recovery under way: 0.2 at 23, 0.4 at 28): 0.4 -> 0.04; 33: the
    # third cut of the emergency, past max_cuts: the factor stays, the run goes on
    assert lr_cuts(opt) == [(3, 1.0, 0.1), (30, 0.4, 0.4 * 0.1)]
    assert opt.stats()["lr_factor"] == pytest.approx(0.04) and opt.stats()["rollbacks"] == 3


def test_isolated_emergencies_each_recovered_never_add_up() -> None:
    bad_steps = {5 + 40 * i for i in range(6)}  # six faults, each followed by a full recovery
    opt, _ = run_with_corruptions(EmergencyLR(max_cuts=1), bad_steps, 240)
    assert [step for step, _, _ in lr_cuts(opt)] == sorted(bad_steps)
    assert not opt.stats()["emergency_mode"] and opt.stats()["lr_factor"] == 1.0


def test_by_default_isolated_bad_batches_are_skipped_without_a_cut() -> None:
    # Two NaN losses 30 steps apart: each step is skipped, the LR is never cut.
    opt, used = run_with_nan_losses(EmergencyLR(), {10, 40}, 60)
    assert lr_cuts(opt) == []
    assert opt.stats()["skipped_steps"] == 2 and opt.stats()["lr_factor"] == 1.0
    assert set(used) == set(range(1, 61)) - {10, 40}
    assert all(lr == 0.05 for lr in used.values())


def test_bad_batches_never_cut_however_often() -> None:
    # 10, 15, 22 (three within 20 steps) and every 3rd step from 30: skipped, never a cut
    nan_steps = {10, 15, 22} | set(range(30, 90, 3))
    opt, used = run_with_nan_losses(EmergencyLR(), nan_steps, 90)
    assert lr_cuts(opt) == [] and opt.stats()["skipped_steps"] == len(nan_steps)
    assert all(lr == 0.05 for lr in used.values())


def test_an_absolute_threshold_cuts_at_its_third_trigger_within_the_window() -> None:
    def run(loud_steps: set[int], **options: Any) -> SafeOptimizer:
        model = make_model()
        opt = SafeOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05),
            spike=None,
            plateau=None,
            emergency_lr=EmergencyLR(loss_threshold=1e6, **options),
        )
        for step in range(1, 50):
            opt.zero_grad()
            loss = backward(model, step)
            opt.observe_loss(torch.tensor(2e6) if step in loud_steps else loss)
            opt.step()
        return opt

    opt = run({10, 15, 22})
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    assert [e.step for e in cuts] == [22]
    assert (cuts[0].data["triggers"], cuts[0].data["trigger_window"]) == (3, 20)
    assert lr_cuts(run({10, 25, 40})) == []  # out of the window: never three
    # with the LR already cut, a single trigger cuts again (after the cool-down)
    assert [s for s, _, _ in lr_cuts(run({10, 15, 22, 30}, cooldown_steps=5))] == [22, 30]


@pytest.mark.parametrize(
    ("bad_steps", "cuts"),
    [({11}, []), ({11, 25}, [25]), ({11, 40}, [])],
)
def test_by_default_a_corrupting_update_cuts_when_it_recurs(
    bad_steps: set[int], cuts: list[int]
) -> None:
    """One update that writes NaN is restored without a cut (the numerics of that update);
    a second within the 20-step window cuts (the LR); one after the window does not."""
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        spike=None,
        plateau=None,
        rollback=Rollback(every_steps=2),
        check_weights="every_step",
    )
    corrupt_weights_hook(model, bad_steps, opt, cut_each=False)
    for step in range(1, 50):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        opt.step()
    assert [e.step for e in opt.events() if e.kind == "lr_cut"] == cuts
    assert [e.step for e in opt.events() if e.kind == "rollback"] == sorted(bad_steps)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_trigger_window_survives_a_resume() -> None:
    policy = EmergencyLR()
    for step in (10, 15):
        assert policy.update(step, NAN_TRIGGER) is None
    resumed = EmergencyLR()
    resumed.load_state_dict(policy.state_dict())
    assert resumed.recent_triggers == [10, 15]
    change = resumed.update(22, NAN_TRIGGER)
    assert change is not None and change.kind == "lr_cut" and resumed.factor == 0.1
    legacy = {k: v for k, v in policy.state_dict().items() if k != "recent_triggers"}
    EmergencyLR().load_state_dict(legacy)  # a state dict from before the trigger count


# ---------------------------------------------------------------------------------
# composition with the user's scheduler

STEPS, WARMUP, NAN_STEP = 120, 20, 60


def hf_linear_warmup(step: int) -> float:
    """transformers.get_linear_schedule_with_warmup's lambda."""
    if step < WARMUP:
        return step / max(1, WARMUP)
    return max(0.0, (STEPS - step) / max(1, STEPS - WARMUP))


SCHEDULES: dict[str, Callable[[Optimizer], Any]] = {
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=STEPS),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=STEPS + 1),
    "LambdaLR_warmup": lambda o: lrs.LambdaLR(o, hf_linear_warmup),
}
INNER: dict[str, Callable[[Any], Optimizer]] = {
    "SGD-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
}


def factor_before(events: list[Any], step: int) -> float:
    """Our factor in force during ``step``, rebuilt from the events of earlier steps."""
    emergency = plateau = 1.0
    for event in events:
        if event.step >= step:
            break
        if event.kind in ("lr_cut", "lr_recovery"):
            emergency = event.data["new_factor"]
        elif event.kind == "plateau":
            plateau = event.data["new_factor"]
    return emergency * plateau


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_update_uses_schedule_times_our_factor(
    schedule: str, inner: str, decide_on: str
) -> None:
    model = make_model()
    opt = SafeOptimizer(
        INNER[inner](model.parameters()),
        spike=None,
        plateau=PlateauLR(
            patience_steps=20, check_every_steps=5, threshold=0.5, cooldown_steps=10**6
        ),
        rollback=Rollback(every_steps=2),
        check_weights="every_step",
    )
    corrupt_weights_hook(model, NAN_STEP, opt)  # rolled back and cut there
    bare = INNER[inner](twin(model).parameters())
    sched, bare_sched = SCHEDULES[schedule](opt), SCHEDULES[schedule](bare)
    used = spy_lrs(opt)
    scheduled: dict[int, float] = {}
    for step in range(1, STEPS + 1):
        scheduled[step] = bare.param_groups[0]["lr"]
        assert opt.param_groups[0]["lr"] == scheduled[step]  # never overwritten by us
        assert opt.effective_lr()[0] == scheduled[step] * opt.stats()["lr_factor"]
        opt.zero_grad()
        loss = backward(model, step)
        opt.observe_loss(loss)
        opt.step()
        bare.step()  # no gradients: only so that the scheduler sees an optimizer step
        sched.step()
        bare_sched.step()
    events = opt.events()
    kinds = [e.kind for e in events]
    assert kinds.count("plateau") == 1 and kinds.count("lr_cut") == 1
    assert next(e.step for e in events if e.kind == "lr_cut") == NAN_STEP
    plateau_step = next(e.step for e in events if e.kind == "plateau")
    assert opt.stats()["lr_changes"] == sum(
        k in ("lr_cut", "lr_recovery", "plateau") for k in kinds
    )
    # the emergency part of the events is the documented recovery rule
    for step in range(1, STEPS + 1):
        emergency = expected_emergency_factor(step, NAN_STEP, 0.1, 20, 5, 2.0)
        plateau = 0.5 if step > plateau_step else 1.0
        assert factor_before(events, step) == emergency * plateau, step
    # and the update used exactly schedule x factor at every step (NAN_STEP's update ran,
    # then was rolled back)
    assert used.keys() == set(range(1, STEPS + 1))
    for step in sorted(used):
        assert used[step] == scheduled[step] * factor_before(events, step), step
    assert len({scheduled[s] for s in used}) > 50  # the schedule really moved


# ---------------------------------------------------------------------------------
# plateau


def synthetic_loss(seed: int, steps: int = 560, flat_from: int = 300) -> np.ndarray:
    """Linear fall from 2 to 1 until ``flat_from``, flat after, 10% multiplicative noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, steps + 1)
    base = np.where(t <= flat_from, 2.0 - t / flat_from, 1.0)
    return base * (1.0 + 0.1 * rng.standard_normal(steps))


def reference_is_improving(window: np.ndarray, significance: float, threshold: float) -> bool:
    """OLS slope, its t statistic and one-sided p-value written out (no linregress)."""
    n = len(window)
    x = np.arange(n, dtype=np.float64)
    x_mean, y_mean = x.mean(), window.mean()
    sxx = ((x - x_mean) ** 2).sum()
    slope = ((x - x_mean) * (window - y_mean)).sum() / sxx
    residuals = window - (y_mean + slope * (x - x_mean))
    t = slope / math.sqrt((residuals**2).sum() / (n - 2) / sxx)
    p_down = float(scipy_stats.t.cdf(t, n - 2))
    return p_down < significance and -slope * (n - 1) / abs(y_mean) >= threshold


def first_reference_reduction(losses: np.ndarray, patience: int, every: int) -> int | None:
    for step in range(every, len(losses) + 1, every):
        if step >= patience and not reference_is_improving(
            losses[step - patience : step], 0.05, 0.01
        ):
            return step
    return None


def dummy_run(plateau: PlateauLR, losses: np.ndarray, nan_at: int | None = None) -> SafeOptimizer:
    """Only the loss matters: a parameter whose gradient is always zero."""
    weight = nn.Parameter(torch.zeros(3))
    opt = SafeOptimizer(
        torch.optim.SGD([weight], lr=0.1),
        clip=None,
        spike=None,
        plateau=plateau,
    )
    for step, loss in enumerate(losses, start=1):
        weight.grad = torch.zeros(3)
        opt.observe_loss(math.nan if step == nan_at else float(loss))
        opt.step()
    return opt


@pytest.mark.parametrize("seed", range(5))
def test_plateau_fires_after_the_plateau_starts_and_never_while_improving(seed: int) -> None:
    patience, every = 100, 10
    losses = synthetic_loss(seed)
    opt = dummy_run(
        PlateauLR(patience_steps=patience, check_every_steps=every, cooldown_steps=10**6), losses
    )
    reductions = [e for e in opt.events() if e.kind == "plateau"]
    assert len(reductions) == 1
    step = reductions[0].step
    assert 300 < step <= 300 + patience + every
    # the same step as the trend test written out on the float32 losses the optimizer saw
    seen = losses.astype(np.float32).astype(np.float64)
    assert step == first_reference_reduction(seen, patience, every)
    assert opt.stats()["lr_factor"] == 0.5 and reductions[0].cause is Cause.LOSS_PLATEAU
    assert reductions[0].data["window"] == patience


def test_skips_restart_the_window() -> None:
    flat = np.ones(60)

    def policy() -> PlateauLR:
        return PlateauLR(patience_steps=20, check_every_steps=5, cooldown_steps=10**6)

    assert [e.step for e in dummy_run(policy(), flat).events() if e.kind == "plateau"] == [20]
    # a NaN at 15: skipped (never enters the window), window and check clock restarted:
    # the 20 fresh losses of steps 16..35 are complete at 35, the next check (every 5 from
    # the restart at 15) is at 39
    opt = dummy_run(policy(), flat, nan_at=15)
    assert [e.step for e in opt.events() if e.kind == "plateau"] == [39]
    assert [e.step for e in opt.events() if e.kind == "skip"] == [15]


def test_cooldown_then_repeated_reductions_and_min_max_lr() -> None:
    plateau = PlateauLR(patience_steps=10, check_every_steps=5, cooldown_steps=5, min_lr=0.02)
    weight = nn.Parameter(torch.zeros(3))
    opt = SafeOptimizer(
        torch.optim.SGD([weight], lr=0.1),
        clip=None,
        spike=None,
        plateau=plateau,
        emergency_lr=EmergencyLR(min_triggers=1),
    )
    used = spy_lrs(opt)
    for _ in range(60):
        weight.grad = torch.zeros(3)
        opt.observe_loss(1.0)
        opt.step()
    # check at 10, cool-down 5 steps, then 10 fresh losses checked every 5 -> 25, 40, 55
    assert [e.step for e in opt.events() if e.kind == "plateau"] == [10, 25, 40, 55]
    assert used[11] == 0.1 * 0.5 and used[26] == 0.1 * 0.25 and used[41] == 0.02  # floor
    capped = SafeOptimizer(
        torch.optim.SGD([weight], lr=0.1), spike=None, plateau=PlateauLR(max_lr=0.03)
    )
    capped_used = spy_lrs(capped)
    weight.grad = torch.zeros(3)
    capped.step()
    assert capped_used[1] == 0.03 and capped.param_groups[0]["lr"] == 0.1


def linear_task(seed: int, step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.randn(16, 1, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(n, 16, generator=g)
    return x, x @ teacher + 0.5 * torch.randn(n, 1, generator=g)


def excess_risk(seed: int, plateau: PlateauLR | None) -> float:
    """Noisy linear regression, SGD at an LR too high to settle: ||w - w*||^2 + b^2 at the end."""
    torch.manual_seed(seed)
    model = nn.Linear(16, 1)
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        plateau=plateau,
        emergency_lr=EmergencyLR(min_triggers=1),
    )
    for step in range(1, 601):
        x, y = linear_task(seed, step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.observe_loss(loss.detach())
        opt.step()
    teacher = torch.randn(16, 1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((model.weight.T - teacher).square().sum() + model.bias.square().sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_plateau_beats_a_constant_lr_on_a_noisy_plateau(seed: int) -> None:
    constant = excess_risk(seed, None)
    reduced = excess_risk(
        seed, PlateauLR(patience_steps=100, check_every_steps=10, cooldown_steps=20)
    )
    assert reduced < 0.6 * constant, (reduced, constant)


def test_without_a_loss_plateau_is_inactive_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stableopt")
    model = make_model()
    plateau = PlateauLR(patience_steps=5, check_every_steps=1)
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        plateau=plateau,
        emergency_lr=EmergencyLR(min_triggers=1),
    )
    for step in range(30):
        opt.zero_grad()
        backward(model, step)
        opt.step()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("stableopt")]
    assert len([m for m in messages if m.startswith("no loss seen")]) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert re.match(
        r"no loss seen at step 1: spike \(loss\), hot_lr, plateau are inactive", messages[0]
    )
    assert opt.stats()["inactive_stages"] == ["spike (loss)", "hot_lr", "plateau"]
    assert plateau.factor == 1.0 and plateau.state_dict()["count"] == 0
    opt.zero_grad()
    opt.observe_loss(backward(model, 30))  # a loss: active from now on, no second message
    opt.step()
    assert plateau.state_dict()["count"] == 1
    assert len([r for r in caplog.records if r.getMessage().startswith("no loss seen")]) == 1


# ---------------------------------------------------------------------------------
# checkpoints

RESUME_STEPS, SAVE_AT = 60, 30
RESUME_FAULTS = {12: "spike", 20: "corrupt", 34: "spike", 45: "corrupt"}


def build_resumable(seed: int = 0) -> tuple[nn.Module, SafeOptimizer, Any]:
    model = make_model(seed)
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        spike=SpikeGuard(window_steps=8, min_history=6),
        emergency_lr=EmergencyLR(recovery_after_steps=6, recovery_every_steps=3),
        plateau=PlateauLR(patience_steps=8, check_every_steps=3, cooldown_steps=4, threshold=0.3),
        rollback=Rollback(every_steps=5, in_state_dict=True),
        check_weights="every_step",
    )
    corrupt_weights_hook(model, {s for s, f in RESUME_FAULTS.items() if f == "corrupt"}, opt)
    return model, opt, lrs.CosineAnnealingLR(opt, T_max=RESUME_STEPS)


def train_resumable(model: nn.Module, opt: SafeOptimizer, sched: Any, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        loss = backward(model, step)
        if RESUME_FAULTS.get(step) == "spike":
            scale_grads(model, 1e5)
        opt.observe_loss(loss)
        opt.step()
        sched.step()


def test_state_dict_resume_is_bit_identical_through_cuts_spikes_and_plateaus() -> None:
    model, opt, sched = build_resumable()
    train_resumable(model, opt, sched, range(1, RESUME_STEPS + 1))

    first, first_opt, first_sched = build_resumable()
    train_resumable(first, first_opt, first_sched, range(1, SAVE_AT + 1))
    assert first_opt.stats()["emergency_mode"]  # the save falls inside an emergency
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first.state_dict(),
            "opt": first_opt.state_dict(),
            "sched": first_sched.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed, resumed_opt, resumed_sched = build_resumable(seed=123)  # other weights
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    train_resumable(resumed, resumed_opt, resumed_sched, range(SAVE_AT + 1, RESUME_STEPS + 1))

    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt.stats() == resumed_opt.stats()
    assert opt.events() == resumed_opt.events()
    kinds = {(e.step <= SAVE_AT, e.kind) for e in opt.events()}
    for side in (True, False):  # a spike skip and a cut on both sides of the save
        assert (side, "lr_cut") in kinds and (side, "skip") in kinds
    assert (True, "plateau") in kinds or (False, "plateau") in kinds
    assert opt.stats()["spike_skips"] >= 2
    for name in ("spike", "emergency_lr", "plateau"):
        a = getattr(opt, name).state_dict()
        b = getattr(resumed_opt, name).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):  # NaN: the empty slots of a window
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)
            else:
                assert a[key] == b[key], (name, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plateau_window_survives_a_resume_on_cuda() -> None:
    plateau = PlateauLR(patience_steps=10)
    for value in range(7):
        plateau.observe(
            torch.tensor(float(value), device="cuda"), torch.tensor(True, device="cuda")
        )
    restored = PlateauLR(patience_steps=10)
    restored.load_state_dict(plateau.state_dict())  # CPU tensors
    restored.observe(torch.tensor(7.0, device="cuda"), torch.tensor(True, device="cuda"))
    assert restored.state_dict()["count"] == 8
    assert restored.state_dict()["losses"][:8].tolist() == [float(v) for v in range(8)]


# ---------------------------------------------------------------------------------
# arguments

BAD_ARGUMENTS: list[tuple[type, dict[str, Any], type[Exception], str]] = [
    (EmergencyLR, {"factor": 0}, ValueError, "factor"),
    (EmergencyLR, {"factor": 1.0}, ValueError, "factor"),
    (EmergencyLR, {"factor": 1.5}, ValueError, "factor"),
    (EmergencyLR, {"factor": "0.1"}, TypeError, "factor"),
    (EmergencyLR, {"grad_norm_threshold": 0}, ValueError, "grad_norm_threshold"),
    (EmergencyLR, {"grad_norm_threshold": math.nan}, ValueError, "grad_norm_threshold"),
    (EmergencyLR, {"grad_norm_threshold": "1000"}, TypeError, "grad_norm_threshold"),
    (EmergencyLR, {"loss_threshold": -1.0}, ValueError, "loss_threshold"),
    (EmergencyLR, {"loss_threshold": [1e6]}, TypeError, "loss_threshold"),
    (EmergencyLR, {"min_lr": -1e-3}, ValueError, "min_lr"),
    (EmergencyLR, {"min_lr": math.inf}, ValueError, "min_lr"),
    (EmergencyLR, {"cooldown_steps": -1}, ValueError, "cooldown_steps"),
    (EmergencyLR, {"cooldown_steps": 2.0}, TypeError, "cooldown_steps"),
    (EmergencyLR, {"recovery_after_steps": 0}, ValueError, "recovery_after_steps"),
    (EmergencyLR, {"recovery_after_steps": True}, TypeError, "recovery_after_steps"),
    (EmergencyLR, {"recovery_every_steps": 0}, ValueError, "recovery_every_steps"),
    (EmergencyLR, {"recovery_every_steps": "5"}, TypeError, "recovery_every_steps"),
    (EmergencyLR, {"recovery_growth": 1.0}, ValueError, "recovery_growth"),
    (EmergencyLR, {"recovery_growth": math.inf}, ValueError, "recovery_growth"),
    (EmergencyLR, {"recovery_growth": None}, TypeError, "recovery_growth"),
    (EmergencyLR, {"max_cuts": 0}, ValueError, "max_cuts"),
    (EmergencyLR, {"min_triggers": 0}, ValueError, "min_triggers"),
    (EmergencyLR, {"min_triggers": 2.0}, TypeError, "min_triggers"),
    (EmergencyLR, {"trigger_window": 0}, ValueError, "trigger_window"),
    (EmergencyLR, {"max_cuts": 4.0}, TypeError, "max_cuts"),
    (PlateauLR, {"patience_steps": 2}, ValueError, "patience_steps"),
    (PlateauLR, {"patience_steps": 100.0}, TypeError, "patience_steps"),
    (PlateauLR, {"factor": 0.0}, ValueError, "factor"),
    (PlateauLR, {"factor": 1}, ValueError, "factor"),
    (PlateauLR, {"factor": "half"}, TypeError, "factor"),
    (PlateauLR, {"threshold": -0.01}, ValueError, "threshold"),
    (PlateauLR, {"threshold": math.nan}, ValueError, "threshold"),
    (PlateauLR, {"threshold": None}, TypeError, "threshold"),
    (PlateauLR, {"significance": 0.0}, ValueError, "significance"),
    (PlateauLR, {"significance": 1.5}, ValueError, "significance"),
    (PlateauLR, {"significance": "0.05"}, TypeError, "significance"),
    (PlateauLR, {"cooldown_steps": -5}, ValueError, "cooldown_steps"),
    (PlateauLR, {"cooldown_steps": 1.5}, TypeError, "cooldown_steps"),
    (PlateauLR, {"min_lr": -1.0}, ValueError, "min_lr"),
    (PlateauLR, {"min_lr": "0"}, TypeError, "min_lr"),
    (PlateauLR, {"max_lr": 0.0}, ValueError, "max_lr"),
    (PlateauLR, {"max_lr": math.inf}, ValueError, "max_lr"),
    (PlateauLR, {"max_lr": "1e-3"}, TypeError, "max_lr"),
    (PlateauLR, {"min_lr": 0.1, "max_lr": 0.01}, ValueError, "max_lr"),
    (PlateauLR, {"check_every_steps": 0}, ValueError, "check_every_steps"),
    (PlateauLR, {"check_every_steps": False}, TypeError, "check_every_steps"),
]


@pytest.mark.parametrize(
    "cls, kwargs, error, name",
    BAD_ARGUMENTS,
    ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_name_the_argument(
    cls: type, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=rf"^{name} "):
        cls(**kwargs)


def test_stage_arguments_of_the_wrong_type_are_refused() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="emergency_lr"):
        SafeOptimizer(torch.optim.SGD(params, lr=0.1), emergency_lr=PlateauLR())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plateau"):
        SafeOptimizer(torch.optim.SGD(params, lr=0.1), plateau="on")  # type: ignore[arg-type]
