"""The response: what the pipeline does once a step's verdict is known.

Histories take the step's numbers, a snapshot is taken when due, the escalation
state machine (:mod:`stableopt.escalation`) says what the outcome leads to (accept,
skip, a new level, a rollback with an LR cut, a stop), which is carried out, counted
and explained (events); the LR factors move, and a run that cannot make progress
stops with :class:`~stableopt.DivergenceError`. It
all runs on the host from the verdict's numbers: no sync of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from stableopt.buffers import NORM_STATS_RATIO, ModelBuffers
from stableopt.errors import DivergenceError
from stableopt.escalation import Action, Escalation, Transition
from stableopt.ledger import Ledger
from stableopt.monitor import Monitor
from stableopt.rerun import Rerun
from stableopt.stages.base import ClipPolicy
from stableopt.stages.emergency_clip import EmergencyClip
from stableopt.stages.emergency_lr import EmergencyLR
from stableopt.stages.hot_lr import HotLR
from stableopt.stages.lr_factor import LRChange, effective_lr
from stableopt.stages.plateau import PlateauLR
from stableopt.stages.rollback import Rollback
from stableopt.stages.spike import SpikeGuard
from stableopt.verdict import SkipReason, StepOutcome, StepStatus, StepVerdict

__all__ = ["Response"]


class Response:
    """Count, explain and escalate a step's outcome; move the LR factors.

    Args:
        optimizer: the inner optimizer (what a rollback restores, what snapshots copy).
        clip: the clip policy (``None``: off), for its history.
        emergency_clip: the emergency clip (``None``: off), for its cool-down.
        spike: the spike guard (``None``: off): its history and escalation.
        emergency_lr: the emergency LR policy (``None``: off).
        plateau: the plateau LR policy (``None``: off).
        hot_lr: the hot-LR policy (``None``: off): a loss that climbs above where the run
            started is a cut with a rollback.
        rerun: the rerun triage (``None``: off): its per-device counts of transient faults.
        ledger: the bad-batch ledger (``None``: off): every failing step is recorded there.
        rollback: snapshots (``None``: off; a corrupted update then stops the run).
        buffers: the model's buffers, put back when a step does not update (``None``: none).
        monitor: where counters and events go.
        escalation: the state machine of failures (skip, new level, rollback, stop).
        stats: the optimizer's ``stats()``, for the :class:`DivergenceError`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        clip: ClipPolicy | None,
        emergency_clip: EmergencyClip | None,
        spike: SpikeGuard | None,
        emergency_lr: EmergencyLR | None,
        plateau: PlateauLR | None,
        rollback: Rollback | None,
        hot_lr: HotLR | None = None,
        rerun: Rerun | None = None,
        ledger: Ledger | None = None,
        buffers: ModelBuffers | None = None,
        monitor: Monitor,
        escalation: Escalation,
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        self.optimizer = optimizer
        self.clip = clip
        self.emergency_clip = emergency_clip
        self.spike = spike
        self.emergency_lr = emergency_lr
        self.plateau = plateau
        self.hot_lr = hot_lr
        self.rerun = rerun
        self.ledger = ledger
        self._tag: tuple[Any, ...] | None = None  # the step's batch tag (the ledger's)
        self.rollback = rollback
        self.buffers = buffers
        self._restored_all = False  # this step restored the whole snapshot, buffers included
        self.monitor = monitor
        self.escalation = escalation
        self._stats = stats
        self._snapshot_pending = False  # one came due while the loss was elevated
        self._restored_why: str | None = None  # the reason of this step's restore, if any
        self._reproduced = False  # this step's failure was re-run and reproduced
        #: what the last step did in the end (``None`` before the first)
        self.last_outcome: StepOutcome | None = None

    # -- the step's outcome -------------------------------------------------------------

    def is_snapshot_due(self) -> bool:
        """Whether the state after this step, if it is a good one, is to be snapshotted."""
        return self.rollback is not None and (
            self._snapshot_pending or self.rollback.is_due(self.monitor.counters["good_steps"] + 1)
        )

    def respond(
        self,
        verdict: StepVerdict,
        *,
        weights_checked_after_updates: bool,
        tag: tuple[Any, ...] | None = None,
    ) -> None:
        """Everything that follows from ``verdict``; raises when the run cannot go on
        (:meth:`_respond`). ``tag``: the step's batch (:meth:`SafeOptimizer.tag_batch`). A
        step that did not update ends up in the ledger, even one that stops the run."""
        self._tag = tag
        self._restored_all = False
        try:
            self._respond(verdict, weights_checked_after_updates=weights_checked_after_updates)
        finally:
            self._reproduced = False
            outcome = self.last_outcome
            if outcome is not None and outcome.step == verdict.step:
                self._settle_buffers(verdict, outcome.status)
            if (
                self.ledger is not None
                and outcome is not None
                and outcome.step == verdict.step
                and outcome.status != "updated"
                and verdict.skip_reason is not SkipReason.AMP_OVERFLOW
            ):
                self.ledger.record(
                    verdict.step,
                    outcome.status,
                    outcome.reason or "",
                    verdict.grad_norm,
                    verdict.loss,
                    tag,
                )

    def _respond(self, verdict: StepVerdict, *, weights_checked_after_updates: bool) -> None:
        """Everything that follows from ``verdict``; raises when the run cannot go on.

        ``weights_checked_after_updates``: the weights are checked right after every update
        (so a non-finite weight after this step's update was written by it, and one found on
        a step that did not update appeared between steps); otherwise a non-finite weight
        is found later and was left by an earlier update.
        """
        for stage in (self.clip, self.emergency_clip, self.spike, self.plateau):
            if stage is not None:
                stage.observe(verdict.numbers)
        self._restored_why = None
        if verdict.skip_reason is SkipReason.AMP_OVERFLOW and verdict.weights_ok is not False:
            # GradScaler's own overflow skip: its normal dynamics (it lowers the scale),
            # not a failure of the run: no streak, no LR cut, no history.
            self.monitor.count("scaler_skips")
            self._set_outcome(
                verdict, "skipped", "GradScaler found Inf/NaN gradients at its scale (its own skip)"
            )
            return
        step = self.monitor.counters["steps"]
        if (
            not verdict.is_accepted
            and self.ledger is not None
            and self.ledger.is_known_bad(self._tag)
        ):
            self._count_data_fault(verdict)
            return
        transition = self.escalation.next(verdict)
        action = transition.action
        cut_reason = None
        hot_change: LRChange | None = None
        if action is Action.STOP:
            if verdict.weights_ok is False and self.rollback is not None:
                if self.rollback.has_snapshot:  # stop with the last good weights, not these
                    self._restore(f"stopping: {transition.reason}")
            elif not verdict.is_accepted:
                self._count_skip(verdict)
            self.monitor.counters["consecutive_failures"] = self.escalation.consecutive_failures
            self.raise_divergence(transition.reason)
        elif action is Action.ACCEPT:
            hot_change = self._watch_hot_lr(verdict)
            climbing = self.hot_lr is not None and (
                self.hot_lr.is_elevated or hot_change is not None and hot_change.kind == "lr_cut"
            )
            # lazy checks every parameter before a snapshot: the snapshot need not again
            self._count_good_step(
                verdict,
                verified=verdict.weights_ok is True and not weights_checked_after_updates,
                defer_snapshot=climbing,  # not of weights whose loss is climbing: later
            )
            self._record_lr_change(hot_change)
            if hot_change is not None and hot_change.kind == "lr_cut":
                if self.rollback is not None and self.rollback.has_snapshot:
                    self._restore("the LR is too hot (the loss climbed: see the LR cut)")
                    action = Action.ROLLBACK
                cut_reason = hot_change.reason
        elif action is Action.ROLLBACK:
            if verdict.weights_ok is False:
                by_update = verdict.is_accepted or not weights_checked_after_updates
                if not weights_checked_after_updates:
                    cause = "non-finite weights found (left by an earlier update)"
                elif verdict.is_accepted:
                    cause = "the update left non-finite weights"
                else:
                    cause = "non-finite weights appeared between steps (no update wrote them)"
                why = f"{cause} (gradient norm {verdict.grad_norm:.4g})"
                self._restore(why, only=verdict.bad_params)
                # an update that made the state bad again soon after the last time says the
                # LR is the cause and cuts it; once alone it is the numerics of one update
                # (silent corruption, an unlucky eps): restored, not cut. A corruption from
                # outside (a bit flip, user code) says nothing about the LR.
                if by_update and (
                    self.emergency_lr is None or self.emergency_lr.weight_fault(step)
                ):
                    cut_reason = why
            else:
                self.monitor.count("skipped_steps")
                why = f"{self._skip_cause(verdict)}; {transition.reason}"
                self._restore(why)
                cut_reason = why
        else:  # a skip, maybe with a new level
            self._count_skip(verdict)
            if action is Action.RELEARN:
                self._relearn(transition)
        if verdict.is_spike and self.spike is not None:
            self.monitor.count("spike_skips")
        is_healthy = action is Action.ACCEPT
        hot_cut = hot_change is not None and hot_change.kind == "lr_cut"
        if self.hot_lr is not None and action is Action.ROLLBACK and not hot_cut:
            self.hot_lr.restart()  # the losses it holds came from weights that are gone
        if self.emergency_lr is not None:
            emergency_reason = None if hot_cut else cut_reason  # the hot-LR policy cut already
            trigger = (
                emergency_reason
                if emergency_reason is not None
                else self._threshold_trigger(verdict)
            )
            immediate = emergency_reason is not None
            self._record_lr_change(
                self.emergency_lr.update(
                    step, trigger, is_healthy=is_healthy and not hot_cut, immediate=immediate
                )
            )
        if self.plateau is not None:
            if not is_healthy or cut_reason is not None:
                self.plateau.restart()
            self._record_lr_change(self.plateau.update())
        outcome = {Action.ACCEPT: "ok", Action.ROLLBACK: "rollback"}.get(action, "skip")
        if outcome == "ok" and verdict.is_emergency:
            outcome = "emergency_clip"
        self.monitor.record_step(outcome)
        self.monitor.counters["consecutive_failures"] = self.escalation.consecutive_failures
        if action is Action.ACCEPT:
            self._set_outcome(verdict, "updated", None)
        elif action is Action.ROLLBACK:
            self._set_outcome(verdict, "rolled_back", self._restored_why)
        else:
            self._set_outcome(verdict, "skipped", self._skip_cause(verdict))

    def _settle_buffers(self, verdict: StepVerdict, status: StepStatus) -> None:
        """The model's buffers after the step: as before its forward pass when its update
        did not run (unless a full restore put the snapshot's back), and wherever the
        forward pass left a NaN or Inf."""
        if self.buffers is None or self._restored_all:
            return
        if status == "updated" or (status == "rolled_back" and verdict.is_accepted):
            if verdict.bad_buffers:
                self.buffers.put_back(verdict.bad_buffers)
                self._buffers_event(verdict.bad_buffers, skipped=False)
            return
        bad = self.buffers.put_back()
        if bad:
            self._buffers_event(bad, skipped=True)

    def _buffers_event(self, bad: tuple[int, ...], *, skipped: bool) -> None:
        assert self.buffers is not None
        what = self.buffers.describe(bad)
        if skipped:
            reason = (
                f"{what} became NaN/Inf in the forward pass of the skipped batch: restored "
                "to their values before it (the model equals one that never saw the batch)"
            )
        else:
            reason = (
                f"{what} became NaN/Inf in the forward pass of this step although its loss "
                "and gradients were finite (NaN/Inf in inputs the loss does not count, such "
                "as padding): restored to their values before it; the update was kept"
            )
        self.monitor.count("buffer_restores")
        self.monitor.event(
            "buffers_restored",
            reason,
            modules=float(len(self.buffers.modules_of(bad))),
            buffers=float(len(bad)),
            skipped=float(skipped),
        )

    def _set_outcome(self, verdict: StepVerdict, status: StepStatus, reason: str | None) -> None:
        self.last_outcome = StepOutcome(
            step=verdict.step,
            status=status,
            reason=reason,
            skip_reason=verdict.skip_reason,
            clip_coefficient=verdict.clip_coefficient if verdict.is_accepted else 1.0,
            is_clipped=verdict.is_clipped and verdict.is_accepted,
            lr_factor=self.lr_factor,
        )

    def _watch_hot_lr(self, verdict: StepVerdict) -> LRChange | None:
        """An accepted step's loss to the hot-LR policy; its cut or recovery, if any."""
        if self.hot_lr is None:
            return None
        maximize = any(group.get("maximize", False) for group in self.optimizer.param_groups)
        return self.hot_lr.update(verdict.loss, maximize=maximize)

    def triaged(self, first: StepVerdict, second: StepVerdict, devices: list[str]) -> None:
        """The outcome of a re-run (:mod:`stableopt.rerun`): a transient fault when the second
        evaluation is healthy, else the skip that follows says it was reproduced."""
        if not second.is_accepted:
            self._reproduced = True
            return
        assert self.rerun is not None
        self.rerun.count(devices)
        self.monitor.count("transient_faults")
        self.monitor.event(
            "transient_fault",
            f"transient fault (possible silent data corruption) on {', '.join(devices)}: the "
            f"first evaluation of the step gave {self._skip_cause(first)}; the re-run on the "
            f"same batch and RNG state is healthy (gradient norm {second.grad_norm:.4g}): the "
            "step goes on with the re-run's gradients",
            grad_norm=second.grad_norm,
            first_grad_norm=first.grad_norm,
        )

    def _count_data_fault(self, verdict: StepVerdict) -> None:
        """A tagged batch that failed before fails again: the data, whatever the weights.
        Skipped, and not a failure of the run: no streak, no rollback, no LR cut."""
        assert self.ledger is not None and self._tag is not None
        first = next((e.step for e in self.ledger.entries if e.ids == self._tag), None)
        when = f"; it failed first at step {first}" if first is not None else ""
        ids = ", ".join(map(str, self._tag[:8])) + (", ..." if len(self._tag) > 8 else "")
        cause = self._skip_cause(verdict)
        self.monitor.count("skipped_steps")
        self.monitor.count("data_faults")
        reason = (
            f"batch [{ids}] failed again ({cause}{when}): a data "
            "fault, not the state: skipped without counting as a failure of the run (no "
            "rollback, no LR cut); leave its samples out (opt.ledger.bad_ids())"
        )
        self.monitor.event("data_fault", reason, grad_norm=verdict.grad_norm)
        self.monitor.record_step("skip")
        self._set_outcome(verdict, "skipped", reason)

    def _count_skip(self, verdict: StepVerdict) -> None:
        self.monitor.count("skipped_steps")
        reproduced = (
            " (reproducible: the re-run on the same batch and RNG state failed again: the data "
            "or the state, not the device)"
            if self._reproduced
            else ""
        )
        kept = (
            "weights, buffers" if self.buffers is not None and self.buffers.buffers else "weights"
        )
        self.monitor.event(
            "skip",
            f"{self._skip_cause(verdict)}{reproduced}: step skipped, {kept} and optimizer "
            "state unchanged",
            grad_norm=verdict.grad_norm,
        )

    def _relearn(self, transition: Transition) -> None:
        """The histories that judge a step restart from the new level's values."""
        for stage in (self.clip, self.emergency_clip, self.spike):
            rebase = getattr(stage, "rebase", None)
            if rebase is not None:
                rebase(transition.new_level)
        if self.plateau is not None:
            self.plateau.restart()
        if self.hot_lr is not None:
            self.hot_lr.rebase()
        if self.buffers is not None:
            self.buffers.accept_level()
        norms = [n.grad_norm for n in transition.new_level]
        self.monitor.count("new_levels")
        self.monitor.event(
            "new_level",
            f"{transition.reason}: gradient norm now about {sorted(norms)[len(norms) // 2]:.4g}",
            grad_norm=float(sorted(norms)[len(norms) // 2]),
        )

    def _count_good_step(
        self, verdict: StepVerdict, verified: bool, defer_snapshot: bool = False
    ) -> None:
        self.monitor.count("good_steps")
        if verdict.is_clipped:
            self.monitor.count("total_clips")
        if verdict.is_emergency:
            self.monitor.count("emergency_clips")
            self.monitor.event(
                "emergency_clip",
                f"gradient norm {verdict.grad_norm:.4g} is above the emergency threshold: "
                f"clipped to {verdict.clip_threshold:.4g}",
                grad_norm=verdict.grad_norm,
                clip_threshold=float(verdict.clip_threshold or 0.0),
            )
        due = self.rollback is not None and (
            self._snapshot_pending or self.rollback.is_due(self.monitor.counters["good_steps"])
        )
        if due and defer_snapshot:
            self._snapshot_pending = True
        elif due:
            self._snapshot_pending = False
            bad = self.take_snapshot(self.monitor.counters["steps"], verified)
            if bad:  # found by the snapshot's own check: weights no update wrote (frozen ones)
                self._restore("non-finite weights found when taking a snapshot", only=bad)

    def take_snapshot(self, step: int, verified: bool = False) -> tuple[int, ...]:
        """Snapshot the weights and the optimizer state, and the histories that judge a step.

        The histories (the clip policy's, the emergency clip's, the spike guard's) go back
        with the weights on a restore: the values after the snapshot came from weights
        that are gone, and judged against them the restored run's first steps would look
        like spikes.
        """
        assert self.rollback is not None
        buffers = self.buffers.tensors() if self.buffers is not None else []
        bad = self.rollback.take(self.optimizer, step, verified, buffers=buffers)
        if not bad:
            self.rollback.stage_states = {
                name: copy.deepcopy(stage.state_dict())
                for name, stage in self._judging_stages().items()
            }
        return bad

    def _judging_stages(self) -> dict[str, Any]:
        stages = {"clip": self.clip, "emergency_clip": self.emergency_clip, "spike": self.spike}
        return {name: stage for name, stage in stages.items() if stage is not None}

    def _skip_cause(self, verdict: StepVerdict) -> str:
        grad_norm, reason = verdict.grad_norm, verdict.skip_reason
        if reason is SkipReason.NONFINITE_GRADS and not verdict.loss_finite:
            # the loss is the cause: the gradients computed from it are non-finite with it
            return (
                f"the loss is NaN/Inf ({verdict.loss}), and so are the gradients computed "
                f"from it (gradient norm {grad_norm})"
            )
        if reason is SkipReason.NONFINITE_GRADS:
            return f"gradient norm is {grad_norm} (NaN/Inf in the gradients)"
        if reason is SkipReason.NONFINITE_LOSS:
            return f"the loss is NaN/Inf ({verdict.loss}) with finite gradients"
        if reason is SkipReason.ABOVE_SKIP_LIMIT:
            limit = self.emergency_clip.skip_above if self.emergency_clip is not None else None
            return f"gradient norm {grad_norm:.4g} is above skip_above={limit}"
        if self.spike is not None and reason is SkipReason.LOSS_SPIKE:
            loss = float(verdict.loss or 0.0)
            return f"loss spike ({loss:.4g}, {self.spike.explain('loss', loss)})"
        if self.spike is not None and reason is SkipReason.GRAD_NORM_SPIKE:
            return f"gradient-norm spike ({grad_norm:.4g}, {self.spike.explain('grad_norm', grad_norm)})"
        if reason is SkipReason.NORM_STATS_SPIKE and self.buffers is not None:
            path, growth = self.buffers.norm_stats_detail()
            return (
                f"running-statistics spike (the running variance of `{path}` grew {growth:.3g}x "
                "in the forward pass: a batch far outside the data, its variance about "
                f"{NORM_STATS_RATIO:g}x the running one or more; gradient norm {grad_norm:.4g})"
            )
        return f"step rejected (gradient norm {grad_norm:.4g})"

    def _threshold_trigger(self, verdict: StepVerdict) -> str | None:
        """An absolute threshold of the emergency LR policy crossed (when set), or ``None``."""
        assert self.emergency_lr is not None
        if not verdict.is_accepted:
            return None  # a skipped step touched nothing: never a reason to cut
        triggers = self.emergency_lr.triggers(verdict.grad_norm, verdict.loss)
        if triggers["grad_norm_above_threshold"]:
            threshold = self.emergency_lr.grad_norm_threshold
            return f"gradient norm {verdict.grad_norm:.4g} above grad_norm_threshold={threshold:g}"
        if triggers["loss_above_threshold"]:
            return f"loss above loss_threshold={self.emergency_lr.loss_threshold:g}"
        return None

    def _record_lr_change(self, change: LRChange | None) -> None:
        if change is None:
            return
        self.monitor.count("lr_changes")
        self.monitor.event(
            change.kind, change.reason, old_factor=change.old_factor, new_factor=change.new_factor
        )

    def _restore(self, why: str, only: tuple[int, ...] = ()) -> None:
        """Restore the snapshot: the parameters ``only`` names (and their state) when the
        rollback restores what is corrupted, else everything."""
        self._restored_why = why
        if self.rollback is None or not self.rollback.has_snapshot:
            self.raise_divergence(
                f"{why}, and rollback is off: nothing good to restore", weights_are_good=False
            )
        assert self.rollback is not None
        partial = bool(only) and self.rollback.scope in ("corrupted", "entries")
        entries = partial and self.rollback.scope == "entries"
        buffers = self.buffers.tensors() if self.buffers is not None and not partial else []
        self.rollback.restore(
            self.optimizer, only if partial else None, entries=entries, buffers=buffers
        )
        self._restored_all = not partial
        for name, stage in self._judging_stages().items():
            if name in self.rollback.stage_states and not partial:
                stage.load_state_dict(copy.deepcopy(self.rollback.stage_states[name]))
        snapshot = f"the snapshot of step {self.rollback.snapshot_step}"
        if entries:  # every finite value, and the histories, are this step's and stay
            what = (
                f"the non-finite entries of {len(only)} parameter(s) and of their state "
                f"restored from {snapshot}; every finite value kept"
            )
        elif partial:  # the other parameters and the histories are this step's, and stay
            what = (
                f"{len(only)} parameter(s) and their state restored to {snapshot}; every "
                "other parameter kept"
            )
        else:
            kept = "weights, buffers" if buffers else "weights"
            what = f"{kept} and optimizer state restored to {snapshot}"
        self.monitor.count("rollbacks")
        self.monitor.event(
            "rollback", f"{why}: {what}", snapshot_step=float(self.rollback.snapshot_step or 0)
        )

    # -- the LR factor ------------------------------------------------------------------

    @property
    def lr_factor(self) -> float:
        """Our current LR multiplier: emergency x hot-LR x plateau factor (1.0 = none)."""
        factor = 1.0
        if self.emergency_lr is not None:
            factor *= self.emergency_lr.factor
        if self.hot_lr is not None:
            factor *= self.hot_lr.factor
        if self.plateau is not None:
            factor *= self.plateau.factor
        return factor

    def lr_bounds(self) -> tuple[float, float | None]:
        """``(min_lr, max_lr)`` of the effective LR."""
        min_lr = max(
            self.emergency_lr.min_lr if self.emergency_lr is not None else 0.0,
            self.hot_lr.min_lr if self.hot_lr is not None else 0.0,
            self.plateau.min_lr if self.plateau is not None else 0.0,
        )
        return min_lr, self.plateau.max_lr if self.plateau is not None else None

    def effective_lr(self, scheduled: Tensor | float) -> Any:
        """The LR an update with the scheduled LR ``scheduled`` uses."""
        return effective_lr(scheduled, self.lr_factor, *self.lr_bounds())

    # -- stopping -----------------------------------------------------------------------

    def raise_divergence(self, why: str, weights_are_good: bool = True) -> None:
        """Record a ``divergence`` event and raise :class:`DivergenceError`, saying what the
        weights are: the last good ones, or (nothing to restore them from) not finite."""
        self.monitor.event("divergence", why)
        self.last_outcome = StepOutcome(
            step=self.monitor.counters["steps"],
            status="stopped",
            reason=why,
            lr_factor=self.lr_factor,
        )
        weights = (
            "The weights are the last good ones."
            if weights_are_good
            else "The weights hold NaN/Inf values: there was no snapshot to restore them from."
        )
        raise DivergenceError(
            f"stableopt: {why}. {weights} {self._summary()}",
            self._stats(),
            self.monitor.events(),
        )

    def _summary(self) -> str:
        stats = self._stats()
        counters = ", ".join(f"{k}={v}" for k, v in stats.items() if k in Monitor.COUNTERS)
        recent = "; ".join(
            f"step {e.step} {e.kind}: {e.reason}" for e in self.monitor.events()[-5:]
        )
        return f"Counters: {counters}. Last events: {recent}"
