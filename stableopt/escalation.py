"""The escalation state machine: what a run of bad steps leads to.

Bad *inputs* (a NaN batch, a poisoned batch, an explosion the spike guard rejects)
are skipped, and skipping them leaves the weights and the optimizer state exactly
as they were; an isolated bad input costs one step and nothing else, however often
it recurs between healthy steps. Only evidence that the *state* has gone bad
escalates: an update that wrote non-finite weights, or so many failed steps in a row
that the weights themselves must be what fails. The states and transitions
(``docs/guard.md`` draws them):

==============  ==============================================  ===============
from            on                                              to, action
==============  ==============================================  ===============
any             an accepted step, weights finite                HEALTHY, accept
                (``recovered_after`` of them since a restore)   (RECOVERING
                                                                until then)
any             a rejected step                                 SKIPPING, skip
SKIPPING        ``relearn_after`` spikes in a row, of values    SKIPPING,
                within ``relearn_spread`` of each other         relearn: the
                                                                histories take
                                                                the new level
any             non-finite weights after an update, or          RECOVERING,
                ``rollback_after`` failed steps in a row        rollback + LR cut
RECOVERING      a rollback again before ``recovered_after``     RECOVERING,
                accepted steps                                  rollback + LR cut
any             ``max_consecutive_failures`` failed steps in a  stop:
                row, or the ``max_restore_failures``-th         DivergenceError
                restore in a row that fails right away
==============  ==============================================  ===============

A failed step is one that was skipped or rolled back. The machine decides on the
host from the step's verdict; :class:`~stableopt.response.Response` carries out the
action (events, restore, LR cut, re-based histories) and raises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt.messages import transition_text
from stableopt.outcomes import Cause, SkipReason
from stableopt.stages.base import StepNumbers
from stableopt.verdict import StepVerdict

__all__ = ["Action", "Escalation", "State", "Transition"]

log = logging.getLogger(__name__)


class State(str, Enum):
    """Where a run stands."""

    #: The last step was accepted.
    HEALTHY = "healthy"
    #: Steps are being rejected (bad inputs); the weights are untouched.
    SKIPPING = "skipping"
    #: Restored from a snapshot, and not yet ``recovered_after`` accepted steps since.
    RECOVERING = "recovering"


class Action(str, Enum):
    """What the response does with a step."""

    ACCEPT = "accept"
    SKIP = "skip"
    #: Skip, and accept the signals' new level: the histories restart from the recent values.
    RELEARN = "relearn"
    #: Restore the last snapshot and cut the LR: an update made the state bad.
    ROLLBACK = "rollback"
    #: Stop with DivergenceError: the run cannot make progress.
    STOP = "stop"


@dataclass(frozen=True)
class Transition:
    """One step of the machine: the action, the states before and after, and why, as data.

    Attributes:
        action: what the response does.
        before: the state before the step.
        after: the state after it.
        cause: why a rollback, a new level or a stop (``Cause.FAILED_STEPS``,
            ``Cause.SPIKES_AT_ONE_LEVEL``, ``Cause.BUDGET_SPENT``,
            ``Cause.RESTORES_FAILED``); ``None`` for an accept or a skip.
        data: the numbers behind it: ``failures`` (the streak), ``weights_failed`` (1: the
            weights were not finite), ``spikes``, ``restores``, and the limits
            ``max_failures`` and ``max_restores``.
        new_level: the rejected steps whose level the histories take (``Action.RELEARN``
            only).
    """

    action: Action
    before: State
    after: State
    cause: Cause | None = None
    data: Mapping[str, float] = field(default_factory=dict)
    new_level: tuple[StepNumbers, ...] = field(default=())

    @property
    def reason(self) -> str:
        """Why, in words (:func:`stableopt.messages.transition_text`); ``""`` without a cause."""
        return transition_text(self.cause, self.data)


class Escalation:
    """The state machine above (see the module docstring), with its limits.

    Args:
        relearn_after: spike skips in a row after which their level is taken as the
            run's new level (default 3, ``>= 1``): a loss re-weighting, a curriculum
            stage, an unfrozen block. The histories (spike windows, clip policy,
            emergency clip) restart from those values, so the next step is judged
            against the new level instead of being skipped forever.
        relearn_spread: the largest ratio between the values of the spikes in a row
            for them to be one level (default 10.0, ``>= 1``); spikes of unrelated sizes
            (separate bad batches) keep being skipped.
        rollback_after: failed steps in a row after which the state, not the inputs, is
            taken to be what fails: the last snapshot is restored and the LR cut (default
            5, ``>= 1``).
        max_consecutive_failures: failed steps in a row that stop the run (default 10,
            ``>= 1``).
        max_restore_failures: restores in a row, each followed by a failure before the
            run recovered, that stop the run (default 3, ``>= 1``).
        recovered_after: accepted steps after a restore that end the recovery (default
            10, ``>= 1``).
    """

    name = "escalation"

    def __init__(
        self,
        relearn_after: int = 3,
        relearn_spread: float = 10.0,
        rollback_after: int = 5,
        max_consecutive_failures: int = 10,
        max_restore_failures: int = 3,
        recovered_after: int = 10,
    ) -> None:
        self.relearn_after = check_int("relearn_after", relearn_after, minimum=1)
        self.relearn_spread = check_float("relearn_spread", relearn_spread, minimum=1.0)
        self.rollback_after = check_int("rollback_after", rollback_after, minimum=1)
        self.max_consecutive_failures = check_int(
            "max_consecutive_failures", max_consecutive_failures, minimum=1
        )
        self.max_restore_failures = check_int(
            "max_restore_failures", max_restore_failures, minimum=1
        )
        self.recovered_after = check_int("recovered_after", recovered_after, minimum=1)
        self.state = State.HEALTHY
        self.consecutive_failures = 0
        self.failed_restores = 0  # restores in a row that failed before the run recovered
        self.accepted_since_restore = 0
        self.spikes: list[StepNumbers] = []  # the spike skips of the current run of failures
        self.loss_spikes = 0  # how many of them were loss spikes

    def next(self, verdict: StepVerdict) -> Transition:
        """The transition ``verdict`` makes (and the machine's new state)."""
        before = self.state
        if verdict.weights_ok is False:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.max_consecutive_failures:
                return self._stop(before, Cause.BUDGET_SPENT, self._budget())
            return self._rollback(before, {"weights_failed": 1.0, **self._budget()})
        if verdict.is_accepted:
            self.consecutive_failures = 0
            self._clear_spikes()
            after = State.HEALTHY
            if before is State.RECOVERING:
                self.accepted_since_restore += 1
                if self.accepted_since_restore < self.recovered_after:
                    after = State.RECOVERING
                else:
                    self.failed_restores = 0
            return self._move(Transition(Action.ACCEPT, before, after))
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.max_consecutive_failures:
            return self._stop(before, Cause.BUDGET_SPENT, self._budget())
        if verdict.is_spike:
            self.spikes.append(verdict.numbers)
            self.loss_spikes += verdict.skip_reason is SkipReason.LOSS_SPIKE
        else:
            self._clear_spikes()  # a non-finite step between spikes: not one level
        if len(self.spikes) >= self.relearn_after and self._is_one_level(self.spikes):
            level, loss_spikes = tuple(self.spikes), self.loss_spikes
            self._clear_spikes()
            after = State.RECOVERING if before is State.RECOVERING else State.SKIPPING
            data = {"spikes": float(len(level)), "loss_spikes": float(loss_spikes)}
            return self._move(
                Transition(Action.RELEARN, before, after, Cause.SPIKES_AT_ONE_LEVEL, data, level)
            )
        if self.consecutive_failures % self.rollback_after == 0:
            return self._rollback(before, self._budget())
        after = State.RECOVERING if before is State.RECOVERING else State.SKIPPING
        return self._move(Transition(Action.SKIP, before, after))

    def _rollback(self, before: State, data: Mapping[str, float]) -> Transition:
        if before is State.RECOVERING:
            self.failed_restores += 1
            if self.failed_restores >= self.max_restore_failures:
                restores = {
                    "restores": float(self.failed_restores),
                    "max_restores": float(self.max_restore_failures),
                }
                return self._stop(before, Cause.RESTORES_FAILED, {**data, **restores})
        else:
            self.failed_restores = 0
        self.accepted_since_restore = 0
        self._clear_spikes()
        return self._move(
            Transition(Action.ROLLBACK, before, State.RECOVERING, Cause.FAILED_STEPS, data)
        )

    def _clear_spikes(self) -> None:
        self.spikes.clear()
        self.loss_spikes = 0

    def _budget(self) -> dict[str, float]:
        return {
            "failures": float(self.consecutive_failures),
            "max_failures": float(self.max_consecutive_failures),
        }

    def _stop(self, before: State, cause: Cause, data: Mapping[str, float]) -> Transition:
        return self._move(Transition(Action.STOP, before, before, cause, data))

    def _move(self, transition: Transition) -> Transition:
        if transition.after is not transition.before:
            log.debug(
                "escalation: %s -> %s (%s)%s",
                transition.before.value,
                transition.after.value,
                transition.action.value,
                f": {transition.reason}" if transition.reason else "",
            )
        self.state = transition.after
        return transition

    def _is_one_level(self, spikes: list[StepNumbers]) -> bool:
        """Whether the spikes' values (each signal on its own) are within ``relearn_spread``."""
        for values in (
            [s.grad_norm for s in spikes],
            [s.loss for s in spikes if s.loss is not None],
        ):
            positive = [v for v in values if v is not None and v > 0]
            if len(positive) == len(values) and positive:
                if max(positive) > self.relearn_spread * min(positive):
                    return False
        return True

    def state_dict(self) -> dict[str, Any]:
        """The state, the counters and the current run of spikes (plain data)."""
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "failed_restores": self.failed_restores,
            "accepted_since_restore": self.accepted_since_restore,
            "spikes": [[s.grad_norm, s.loss, s.is_accepted, s.step] for s in self.spikes],
            "loss_spikes": self.loss_spikes,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.state = State(state_dict["state"])
        self.consecutive_failures = int(state_dict["consecutive_failures"])
        self.failed_restores = int(state_dict["failed_restores"])
        self.accepted_since_restore = int(state_dict["accepted_since_restore"])
        self.spikes = [
            StepNumbers(float(g), None if loss is None else float(loss), bool(a), int(s))
            for g, loss, a, s in state_dict["spikes"]
        ]
        self.loss_spikes = int(state_dict.get("loss_spikes", 0))  # absent: saved before it was

    def observe(self, numbers: StepNumbers) -> None:
        """Nothing: the machine takes whole verdicts through :meth:`next`."""

    def __repr__(self) -> str:
        return (
            f"Escalation(relearn_after={self.relearn_after}, relearn_spread={self.relearn_spread:g}, "
            f"rollback_after={self.rollback_after}, "
            f"max_consecutive_failures={self.max_consecutive_failures}, "
            f"max_restore_failures={self.max_restore_failures}, "
            f"recovered_after={self.recovered_after})"
        )
