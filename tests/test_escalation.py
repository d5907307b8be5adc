"""The escalation state machine, transition by transition, against the table it documents."""

from __future__ import annotations

import math

import pytest

from stableopt import Escalation, SkipReason, StepVerdict
from stableopt.escalation import Action, State
from stableopt.outcomes import Cause


def ok(step: int = 0, norm: float = 1.0) -> StepVerdict:
    return StepVerdict(step, norm, 1.0, True, None)


def nan(step: int = 0) -> StepVerdict:
    return StepVerdict(step, math.nan, 1.0, False, SkipReason.NONFINITE_GRADS)


def spike(norm: float, step: int = 0) -> StepVerdict:
    return StepVerdict(step, norm, 1.0, False, SkipReason.GRAD_NORM_SPIKE)


def corrupted(step: int = 0) -> StepVerdict:
    return StepVerdict(step, 1.0, 1.0, True, None, weights_ok=False)


def actions(machine: Escalation, verdicts: list[StepVerdict]) -> list[Action]:
    return [machine.next(v).action for v in verdicts]


def test_isolated_faults_between_accepted_steps_never_add_up() -> None:
    machine = Escalation()
    for _ in range(1000):
        assert machine.next(nan()).action is Action.SKIP
        assert machine.next(spike(1e6)).action is Action.SKIP
        assert machine.next(ok()).action is Action.ACCEPT
    assert machine.state is State.HEALTHY and machine.consecutive_failures == 0


def test_spikes_in_a_row_at_one_level_are_relearnt() -> None:
    machine = Escalation(relearn_after=3, relearn_spread=10.0)
    transitions = [machine.next(spike(norm, step)) for step, norm in enumerate([100, 300, 150])]
    assert [t.action for t in transitions] == [Action.SKIP, Action.SKIP, Action.RELEARN]
    assert [n.grad_norm for n in transitions[-1].new_level] == [100, 300, 150]
    assert machine.spikes == [] and machine.state is State.SKIPPING
    assert machine.next(ok()).action is Action.ACCEPT and machine.state is State.HEALTHY


def test_spikes_of_unrelated_sizes_or_broken_by_a_nan_are_no_level() -> None:
    machine = Escalation()
    assert Action.RELEARN not in actions(machine, [spike(100), spike(5000), spike(100)])
    machine = Escalation()
    assert Action.RELEARN not in actions(machine, [spike(100), nan(), spike(100), spike(100)])


def test_failures_in_a_row_roll_back_then_stop() -> None:
    machine = Escalation(rollback_after=5, max_consecutive_failures=10)
    got = actions(machine, [nan() for _ in range(10)])
    assert got == [Action.SKIP] * 4 + [Action.ROLLBACK] + [Action.SKIP] * 4 + [Action.STOP]
    stop = machine.next(nan())  # a stopped machine keeps saying so
    assert stop.action is Action.STOP and stop.cause is Cause.BUDGET_SPENT
    assert (stop.data["failures"], stop.data["max_failures"]) == (11, 10)


def test_a_restore_that_fails_again_right_away_counts_until_the_run_recovers() -> None:
    machine = Escalation(max_restore_failures=3, recovered_after=4)
    first = machine.next(corrupted())
    assert first.action is Action.ROLLBACK and first.after is State.RECOVERING
    assert actions(machine, [ok(), ok(), corrupted()]) == [Action.ACCEPT] * 2 + [Action.ROLLBACK]
    assert machine.failed_restores == 1
    # recovered (4 accepted steps): the count starts again
    assert actions(machine, [ok()] * 4) == [Action.ACCEPT] * 4 and machine.state is State.HEALTHY
    assert machine.failed_restores == 0
    got = actions(machine, [corrupted(), ok(), corrupted(), corrupted()])
    assert got == [Action.ROLLBACK, Action.ACCEPT, Action.ROLLBACK, Action.ROLLBACK]
    stop = machine.next(corrupted())
    assert stop.action is Action.STOP
    assert stop.cause is Cause.RESTORES_FAILED and stop.data["weights_failed"] == 1.0
    assert (stop.data["restores"], stop.data["max_restores"]) == (3, 3)


def test_the_machine_resumes_mid_streak() -> None:
    machine = Escalation()
    actions(machine, [ok(), spike(100.0, 7), spike(120.0, 8)])
    resumed = Escalation()
    resumed.load_state_dict(machine.state_dict())
    assert resumed.state_dict() == machine.state_dict()
    assert resumed.next(spike(110.0, 9)).action is Action.RELEARN


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"relearn_after": 0}, "relearn_after"),
        ({"relearn_spread": 0.5}, "relearn_spread"),
        ({"rollback_after": 0}, "rollback_after"),
        ({"max_consecutive_failures": 0}, "max_consecutive_failures"),
        ({"max_restore_failures": 1.5}, "max_restore_failures"),
        ({"recovered_after": 0}, "recovered_after"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        Escalation(**kwargs)  # type: ignore[arg-type]
