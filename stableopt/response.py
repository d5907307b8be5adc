"""The response: what the pipeline does once a step's verdict is known.

The stages observe the step's numbers; the escalation state machine
(:mod:`stableopt.escalation`) says what the outcome leads to (accept, skip, a new level, a
rollback with an LR cut, a stop) and the response carries it out with three collaborators,
one job each: the restorer (:mod:`stableopt.restorer`: snapshots and restores), the LR
control (:mod:`stableopt.lr_control`: the factors) and the accounting
(:mod:`stableopt.accounting`: counters, events and the step's outcome, as data). A run that
cannot make progress stops with :class:`~stableopt.DivergenceError`. It all runs on the
host from the verdict's numbers: no sync of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from stableopt.accounting import Accounting, Evidence
from stableopt.buffers import ModelBuffers
from stableopt.errors import DivergenceError
from stableopt.escalation import Action, Transition
from stableopt.evidence import skip_evidence
from stableopt.lr_control import LRControl
from stableopt.messages import divergence_text, weights_text
from stableopt.monitor import Monitor
from stableopt.outcomes import AnyCause, Cause, EventKind, SkipReason
from stableopt.restorer import Restorer
from stableopt.slots import Slots
from stableopt.stages.emergency_lr import Trigger
from stableopt.verdict import StepOutcome, StepStatus, StepVerdict

__all__ = ["Response"]

_STATUS = {Action.ACCEPT: "updated", Action.ROLLBACK: "rolled_back"}


class Response:
    """Decide and carry out what a step's verdict leads to (see the module docstring).

    Args:
        slots: the optimizer's stages.
        accounting: where counters, events and outcomes are written.
        restorer: snapshots and restores.
        lr: the LR factors.
        buffers: the model's buffers (``None``: none watched).
        stats: the optimizer's ``stats()``, for the :class:`DivergenceError`.
    """

    def __init__(
        self,
        slots: Slots,
        accounting: Accounting,
        restorer: Restorer,
        lr: LRControl,
        buffers: ModelBuffers | None,
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        self.slots, self.accounting, self.restorer = slots, accounting, restorer
        self.lr, self.buffers, self._stats = lr, buffers, stats
        self._restored: tuple[AnyCause, Mapping[str, float], dict[str, str]] | None = None
        self._restored_all = False  # this step restored the whole snapshot, buffers included
        self._reproduced = False  # this step's failure was re-run and reproduced
        #: a known cause of failures of this setup, said with a DivergenceError
        self.hint = ""
        self._restored_to: int | None = None  # the snapshot the weights are, since a restore
        self._last_good = 0  # the last step whose update was kept

    @property
    def last_outcome(self) -> StepOutcome | None:
        """What the last step did in the end (``None`` before the first)."""
        return self.accounting.last_outcome

    def is_snapshot_due(self) -> bool:
        """Whether the state after this step, if it is a good one, is to be snapshotted."""
        return self.restorer.is_due(self.accounting.counter("good_steps") + 1)

    def respond(
        self, verdict: StepVerdict, *, weights_checked_after_updates: bool, tag: Any = None
    ) -> None:
        """Everything that follows from ``verdict``; raises when the run cannot go on.

        ``weights_checked_after_updates``: a non-finite weight found after this step's update
        was written by it (else it was left by an earlier one). ``tag``: the step's batch
        (``SafeOptimizer.tag_batch``). A step that did not update ends up in the ledger,
        even one that stops the run.
        """
        self._restored, self._restored_all = None, False
        evidence = self.evidence(verdict)
        try:
            self._respond(verdict, evidence, tag, weights_checked_after_updates)
        finally:
            self._reproduced = False
            outcome = self.last_outcome
            if outcome is not None and outcome.step == verdict.step:
                if self.buffers is not None and not self._restored_all:
                    kept = outcome.status == "updated" or (
                        outcome.status == "rolled_back" and verdict.is_accepted
                    )
                    bad, skipped = self.buffers.after_step(kept, verdict.bad_buffers)
                    self.accounting.buffers_restored(self.buffers, bad, skipped=skipped)
                if verdict.skip_reason is not SkipReason.AMP_OVERFLOW:
                    self.accounting.ledger_entry(self.slots.ledger, verdict, outcome, tag)

    def evidence(self, verdict: StepVerdict) -> Evidence:
        """Why ``verdict``'s step failed, as data (empty for an accepted one)."""
        if verdict.is_accepted and verdict.weights_ok is not False:
            if verdict.is_spike_clipped and self.slots.spike is not None:
                return Evidence(None, self.slots.spike.evidence("grad_norm", verdict.grad_norm))
            return Evidence(None)
        slots = self.slots
        return skip_evidence(
            verdict, spike=slots.spike, emergency_clip=slots.emergency_clip, buffers=self.buffers
        )

    def _respond(
        self, verdict: StepVerdict, evidence: Evidence, tag: Any, checked_after: bool
    ) -> None:
        slots, accounting = self.slots, self.accounting
        numbers = verdict.numbers
        if verdict.is_spike_clipped and verdict.clip_threshold is not None:
            # a spike clipped to the bound is seen at the bound by the histories that judge
            # by norms (as ZClip feeds its own clipped spikes): a spike never makes the
            # yardstick; the spike guard takes the norm itself (it keeps it out, and tells a
            # new level from a few of them)
            clipped = replace(numbers, grad_norm=min(numbers.grad_norm, verdict.clip_threshold))
            for stage in slots.observers():
                stage.observe(numbers if stage is slots.spike else clipped)
        else:
            for stage in slots.observers():
                stage.observe(numbers)
        for change in self.lr.observe(verdict.numbers):  # the factors of your LR policies
            accounting.lr_changed(change)
        if verdict.skip_reason is SkipReason.AMP_OVERFLOW and verdict.weights_ok is not False:
            accounting.scaler_skip()  # GradScaler's own dynamics: no streak, no cut, no history
            return self._outcome(verdict, "skipped", evidence)
        if verdict.skip_reason is SkipReason.ENGINE_OVERFLOW:
            # DeepSpeed skipped it before us (on every rank): a skipped step, told; its
            # loss scale's dynamics or a NaN we never saw, so no streak and no cut
            accounting.skipped(evidence)
            return self._outcome(verdict, "skipped", evidence)
        if not verdict.is_accepted and slots.ledger is not None and slots.ledger.is_known_bad(tag):
            accounting.data_fault(evidence, tag, slots.ledger.first_failure(tag))
            return self._outcome(verdict, "skipped", evidence)
        transition = slots.escalation.next(verdict)
        action, cut, hot_cut = transition.action, None, False
        if action is Action.STOP:
            self._stop_for(verdict, evidence, transition)
        elif action is Action.ACCEPT:
            hot = slots.hot_lr.update(verdict.loss, self._maximize) if slots.hot_lr else None
            hot_cut = hot is not None and hot.kind == EventKind.LR_CUT
            climbing = slots.hot_lr is not None and (slots.hot_lr.is_elevated or hot_cut)
            accounting.accepted(verdict, evidence)
            verified = verdict.weights_ok is True and not checked_after  # lazy checked all
            good = accounting.counter("good_steps")
            bad = self.restorer.after_good_step(accounting.step, good, verified, climbing)
            if bad:  # found by the snapshot's own check: weights no update wrote (frozen ones)
                self._restore(Cause.NONFINITE_AT_SNAPSHOT, {}, only=bad)
            accounting.lr_changed(hot)
            if hot_cut:
                if self.restorer.has_snapshot:
                    self._restore(Cause.HOT_LR, {})
                    action = Action.ROLLBACK
                cut = Trigger(Cause.HOT_LR, {})
        elif action is Action.ROLLBACK:
            cut = self._rollback(verdict, evidence, transition, checked_after)
        else:  # a skip, maybe with a new level
            accounting.skipped(evidence, reproduced=self._reproduced, buffers=self._has_buffers)
            if action is Action.RELEARN:
                self._relearn(transition)
        if verdict.is_spike and slots.spike is not None:
            accounting.spike()
        changes = self.lr.after_step(
            accounting.step,
            verdict,
            is_healthy=action is Action.ACCEPT,
            rolled_back=action is Action.ROLLBACK,
            cut=cut,
            hot_cut=hot_cut,
        )
        for lr_change in changes:
            accounting.lr_changed(lr_change)
        accounting.finished(action, verdict, slots.escalation.consecutive_failures)
        if action is Action.ACCEPT:  # the weights are this step's
            self._restored_to, self._last_good = None, verdict.step
        self._outcome(verdict, _STATUS.get(action, "skipped"), evidence)  # type: ignore[arg-type]

    def _rollback(
        self, verdict: StepVerdict, evidence: Evidence, transition: Transition, checked_after: bool
    ) -> Trigger | None:
        """Carry out a rollback; the LR cut it calls for, if any."""
        if verdict.weights_ok is False:
            if not checked_after:
                cause = Cause.NONFINITE_FOUND_LATE
            elif verdict.is_accepted:
                cause = Cause.UPDATE_WROTE_NONFINITE
            else:
                cause = Cause.NONFINITE_BETWEEN_STEPS
            data = {"grad_norm": verdict.grad_norm}
            self._restore(cause, data, only=verdict.bad_params)
            # an update that made the state bad again soon after the last time says the LR is
            # the cause and cuts it; once alone it is the numerics of one update (silent
            # corruption, an unlucky eps): restored, not cut. A corruption from outside (a
            # bit flip, user code) says nothing about the LR.
            by_update = verdict.is_accepted or not checked_after
            emergency = self.slots.emergency_lr
            if by_update and (emergency is None or emergency.weight_fault(self.accounting.step)):
                return Trigger(cause, data)
            return None
        self.accounting.counted_skip()
        data = {**evidence.data, **transition.data}
        labels = dict(evidence.labels)
        if evidence.cause is not None:
            labels["failed_for"] = evidence.cause.value
        self._restore(Cause.FAILED_STEPS, data, labels)
        return Trigger(Cause.FAILED_STEPS, data, labels)

    def _stop_for(self, verdict: StepVerdict, evidence: Evidence, transition: Transition) -> None:
        """Stop the run: with the last good weights restored where this step's are bad."""
        cause = transition.cause or Cause.BUDGET_SPENT
        if verdict.weights_ok is False and self.slots.rollback is not None:
            if self.restorer.has_snapshot:
                self._restore(cause, transition.data, {"stopping": "1"})
        elif not verdict.is_accepted:
            self.accounting.skipped(
                evidence, reproduced=self._reproduced, buffers=self._has_buffers
            )
        self.accounting.set_failures(self.slots.escalation.consecutive_failures)
        self.stop(cause, transition.data)

    def _outcome(self, verdict: StepVerdict, status: StepStatus, evidence: Evidence) -> None:
        restored = self._restored if status == "rolled_back" else None
        self.accounting.outcome(verdict, status, evidence, restored, self.lr.factor)

    @property
    def _has_buffers(self) -> bool:
        return self.buffers is not None and bool(self.buffers.buffers)

    @property
    def _maximize(self) -> bool:
        return any(group.get("maximize", False) for group in self.restorer.optimizer.param_groups)

    def triaged(self, first: StepVerdict, second: StepVerdict, devices: list[str]) -> None:
        """The outcome of a re-run (:mod:`stableopt.rerun`): a transient fault when the second
        evaluation is healthy, else the skip that follows says it was reproduced."""
        if not second.is_accepted:
            self._reproduced = True
            return
        assert self.slots.rerun is not None
        self.slots.rerun.count(devices)
        self.accounting.transient_fault(self.evidence(first), second.grad_norm, devices)

    def _relearn(self, transition: Transition) -> None:
        """The histories that judge a step restart from the new level's values."""
        slots = self.slots
        for stage in (slots.clip, slots.emergency_clip, slots.spike):
            rebase = getattr(stage, "rebase", None)  # optional member of these roles
            if rebase is not None:
                rebase(transition.new_level)
        if slots.plateau is not None:
            slots.plateau.restart()
        if slots.hot_lr is not None and transition.data.get("loss_spikes", 0.0) > 0:
            # the loss itself has a new scale (a re-weighting): the next losses are the new
            # start of the hot-LR watch; a new level of the gradient norm alone is not one
            slots.hot_lr.rebase()
        if self.buffers is not None:
            self.buffers.accept_level()
        norms = sorted(n.grad_norm for n in transition.new_level)
        self.accounting.new_level(len(norms), float(norms[len(norms) // 2]))

    def restore_between_steps(self, bad: tuple[int, ...]) -> None:
        """Restore the parameters ``bad``, found non-finite before a step that is the first
        on a changed parameter set, from the snapshot (a corruption from outside: no cut)."""
        self._restore(Cause.NONFINITE_BETWEEN_STEPS, {}, only=bad)

    def take_snapshot(self, step: int, verified: bool = False) -> tuple[int, ...]:
        """Snapshot the weights, state, buffers and judging histories (:mod:`stableopt.restorer`)."""
        return self.restorer.take(step, verified, self.accounting.counter("good_steps"))

    def _restore(
        self,
        cause: AnyCause,
        data: Mapping[str, float],
        labels: Mapping[str, str] | None = None,
        only: tuple[int, ...] = (),
    ) -> None:
        """Restore the snapshot: what the parameters ``only`` hold of NaN/Inf when given, as
        the rollback's scope says, else everything."""
        self._restored = (cause, data, dict(labels or {}))
        if not self.restorer.has_snapshot:
            self.stop(cause, data, labels, weights_are_good=False)
        good = self.accounting.counter("good_steps")
        restored = (
            self.restorer.restore_corrupted(only, good) if only else self.restorer.restore_all(good)
        )
        self._restored_all = restored.scope == "all"
        if self._restored_all:
            self._restored_to = restored.snapshot_step
        self.accounting.rolled_back(cause, data, labels or {}, restored)

    def stop(
        self,
        cause: AnyCause,
        data: Mapping[str, float],
        labels: Mapping[str, str] | None = None,
        weights_are_good: bool = True,
    ) -> None:
        """Record a ``divergence`` event and raise :class:`DivergenceError`, saying what the
        weights are: the last good ones, or (nothing to restore them from) not finite."""
        event = self.accounting.diverged(cause, data, labels or {}, self.lr.factor)
        stats = self._stats()
        events = self.accounting.monitor.events()
        counters = {k: v for k, v in stats.items() if k in Monitor.COUNTERS}
        if self._restored_to is not None and weights_are_good:
            undone = self.accounting.counter("good_steps") - self.restorer.snapshot_good_steps
            weights = weights_text(True, self._restored_to, undone, self._last_good)
        else:
            weights = weights_text(weights_are_good, last_good=self._last_good)
        message = divergence_text(event.reason, weights, counters, events)
        if self.hint:
            message += f" A likely cause: {self.hint}."
        raise DivergenceError(message, stats, events)
