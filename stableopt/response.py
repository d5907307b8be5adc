"""The response: what the pipeline does once a step's verdict is known.

Histories take the step's numbers, a snapshot is taken when due, the outcome is
counted and explained (events), repeated spikes escalate, the LR factors move, and
a run past its failure budget stops with :class:`~stableopt.DivergenceError`. It
all runs on the host from the verdict's numbers: no sync of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from stableopt.errors import DivergenceError
from stableopt.monitor import Monitor
from stableopt.stages.base import ClipPolicy
from stableopt.stages.emergency_clip import EmergencyClip
from stableopt.stages.emergency_lr import EmergencyLR
from stableopt.stages.lr_factor import LRChange, effective_lr
from stableopt.stages.plateau import PlateauLR
from stableopt.stages.rollback import Rollback
from stableopt.stages.spike import SpikeGuard
from stableopt.verdict import SkipReason, StepVerdict

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
        rollback: snapshots (``None``: off; a corrupted update then stops the run).
        monitor: where counters and events go.
        max_consecutive_failures: skipped or rolled-back steps in a row that stop the run.
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
        monitor: Monitor,
        max_consecutive_failures: int,
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        self.optimizer = optimizer
        self.clip = clip
        self.emergency_clip = emergency_clip
        self.spike = spike
        self.emergency_lr = emergency_lr
        self.plateau = plateau
        self.rollback = rollback
        self.monitor = monitor
        self.max_consecutive_failures = max_consecutive_failures
        self._stats = stats
        self.spike_streak = 0  # consecutive spike skips

    # -- the step's outcome -------------------------------------------------------------

    def is_snapshot_due(self) -> bool:
        """Whether the state after this step, if it is a good one, is to be snapshotted."""
        return self.rollback is not None and self.rollback.is_due(
            self.monitor.counters["good_steps"] + 1
        )

    def respond(self, verdict: StepVerdict, *, weights_corrupted_by_update: bool) -> None:
        """Everything that follows from ``verdict``; raises past the failure budget.

        ``weights_corrupted_by_update``: the weights were checked right after this
        step's update (so a non-finite weight was written by it), not found later.
        """
        for stage in (self.clip, self.emergency_clip, self.spike, self.plateau):
            if stage is not None:
                stage.observe(verdict.numbers)
        if verdict.skip_reason is SkipReason.AMP_OVERFLOW and verdict.weights_ok is not False:
            # GradScaler's own overflow skip: its normal dynamics (it lowers the scale),
            # not a failure of the run: no streak, no LR cut, no history.
            self.monitor.count("scaler_skips")
            return
        step = self.monitor.counters["steps"]
        if verdict.weights_ok is False:
            outcome = "rollback"
            cause = (
                "the update left non-finite weights"
                if weights_corrupted_by_update
                else "non-finite weights found (left by an earlier update)"
            )
            self._restore(f"{cause} (gradient norm {verdict.grad_norm:.4g})")
        elif not verdict.is_accepted:
            outcome, cause = "skip", self._skip_cause(verdict)
            self.monitor.count("skipped_steps")
            self.monitor.event(
                "skip",
                f"{cause}: step skipped, weights and optimizer state unchanged",
                grad_norm=verdict.grad_norm,
            )
        else:
            outcome, cause = "ok", None
            self._count_good_step(verdict)

        if verdict.is_spike and self.spike is not None:
            self.monitor.count("spike_skips")
            self.spike_streak += 1
            if self.spike_streak == self.spike.cut_after:
                cause = f"{self.spike_streak} consecutive loss/gradient spikes"
            if self.spike_streak >= self.spike.rollback_after:
                self._restore(f"{self.spike_streak} consecutive spikes")
                self.spike.clear()  # a genuine change of regime is learned afresh
                self.spike_streak, outcome = 0, "rollback"
        elif outcome == "ok":
            self.spike_streak = 0

        trigger, immediate = self._lr_trigger(verdict, cause)
        if self.emergency_lr is not None:
            self._record_lr_change(
                self.emergency_lr.update(
                    step, trigger, is_healthy=outcome == "ok", immediate=immediate
                )
            )
            if self.emergency_lr.is_exhausted:
                self.raise_divergence(
                    f"{self.emergency_lr.emergency_cuts} emergency LR cuts without recovering in "
                    f"between (max_emergencies={self.emergency_lr.max_emergencies})"
                )
        if self.plateau is not None:
            if outcome != "ok" or trigger is not None:
                self.plateau.restart()
            self._record_lr_change(self.plateau.update())
        self.monitor.record_step(
            "emergency_clip" if outcome == "ok" and verdict.is_emergency else outcome
        )
        failures = self.monitor.counters["consecutive_failures"]
        if failures >= self.max_consecutive_failures:
            self.raise_divergence(
                f"{failures} consecutive steps were skipped or rolled back "
                f"(max_consecutive_failures={self.max_consecutive_failures})"
            )

    def _count_good_step(self, verdict: StepVerdict) -> None:
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
        if self.rollback is not None and self.rollback.is_due(self.monitor.counters["good_steps"]):
            self.rollback.take(self.optimizer, self.monitor.counters["steps"])

    def _skip_cause(self, verdict: StepVerdict) -> str:
        grad_norm, reason = verdict.grad_norm, verdict.skip_reason
        if reason is SkipReason.NONFINITE_GRADS:
            return f"gradient norm is {grad_norm} (NaN/Inf in the gradients)"
        if reason is SkipReason.NONFINITE_LOSS:
            return "the loss is NaN/Inf"
        if reason is SkipReason.ABOVE_SKIP_LIMIT:
            limit = self.emergency_clip.skip_above if self.emergency_clip is not None else None
            return f"gradient norm {grad_norm:.4g} is above skip_above={limit}"
        if self.spike is not None and reason is SkipReason.LOSS_SPIKE:
            z = self.spike.zscore("loss", float(verdict.loss or 0.0))
            return f"loss spike (robust z = {z:.3g} > {self.spike.z_threshold:g})"
        if self.spike is not None and reason is SkipReason.GRAD_NORM_SPIKE:
            z = self.spike.zscore("grad_norm", grad_norm)
            return (
                f"gradient-norm spike ({grad_norm:.4g}, robust z = {z:.3g} > "
                f"{self.spike.z_threshold:g})"
            )
        return f"step rejected (gradient norm {grad_norm:.4g})"

    def _lr_trigger(self, verdict: StepVerdict, cause: str | None) -> tuple[str | None, bool]:
        """Why the emergency LR policy should cut, or ``None``; and whether at once.

        At once (``True``) where the update itself failed: non-finite weights after
        it, or the spike guard's escalation. A bad batch (non-finite loss or
        gradients, a norm or loss above its threshold) cuts only when it repeats
        (:class:`~stableopt.stages.emergency_lr.EmergencyLR`'s ``min_triggers``).
        """
        if verdict.weights_ok is False:
            return cause, True
        if not verdict.grads_finite or not verdict.loss_finite:
            return cause, False
        if self.emergency_lr is not None:
            triggers = self.emergency_lr.triggers(verdict.grad_norm, verdict.loss)
            if triggers["grad_norm_above_threshold"]:
                threshold = self.emergency_lr.grad_norm_threshold
                return f"gradient norm {verdict.grad_norm:.4g} above {threshold:g}", False
            if triggers["loss_above_threshold"]:
                return f"loss above {self.emergency_lr.loss_threshold:g}", False
        if (
            self.spike is not None
            and cause is not None
            and self.spike_streak == self.spike.cut_after
        ):
            return cause, True
        return None, False

    def _record_lr_change(self, change: LRChange | None) -> None:
        if change is None:
            return
        self.monitor.count("lr_changes")
        self.monitor.event(
            change.kind, change.reason, old_factor=change.old_factor, new_factor=change.new_factor
        )

    def _restore(self, why: str) -> None:
        if self.rollback is None or not self.rollback.has_snapshot:
            self.raise_divergence(f"{why}, and rollback is off: nothing good to restore")
        assert self.rollback is not None
        self.rollback.restore(self.optimizer)
        self.monitor.count("rollbacks")
        self.monitor.event(
            "rollback",
            f"{why}: weights and optimizer state restored to the snapshot of step {self.rollback.snapshot_step}",
            snapshot_step=float(self.rollback.snapshot_step or 0),
        )

    # -- the LR factor ------------------------------------------------------------------

    @property
    def lr_factor(self) -> float:
        """Our current LR multiplier: emergency factor x plateau factor (1.0 = none)."""
        factor = 1.0
        if self.emergency_lr is not None:
            factor *= self.emergency_lr.factor
        if self.plateau is not None:
            factor *= self.plateau.factor
        return factor

    def lr_bounds(self) -> tuple[float, float | None]:
        """``(min_lr, max_lr)`` of the effective LR."""
        min_lr = max(
            self.emergency_lr.min_lr if self.emergency_lr is not None else 0.0,
            self.plateau.min_lr if self.plateau is not None else 0.0,
        )
        return min_lr, self.plateau.max_lr if self.plateau is not None else None

    def effective_lr(self, scheduled: Tensor | float) -> Any:
        """The LR an update with the scheduled LR ``scheduled`` uses."""
        return effective_lr(scheduled, self.lr_factor, *self.lr_bounds())

    # -- stopping -----------------------------------------------------------------------

    def raise_divergence(self, why: str) -> None:
        """Record a ``divergence`` event and raise :class:`DivergenceError`."""
        self.monitor.event("divergence", why)
        raise DivergenceError(
            f"stableopt: {why}. The weights are the last good ones. {self._summary()}",
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

    def state_dict(self) -> dict[str, Any]:
        """The response's own state: the spike streak."""
        return {"spike_streak": self.spike_streak}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.spike_streak = int(state_dict["spike_streak"])
