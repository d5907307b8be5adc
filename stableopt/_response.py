"""What the pipeline does once a step's outcome is known: count it, escalate, move the LR.

Kept apart from :mod:`stableopt.optimizer` (the ``Optimizer`` contract and the step
itself) because it is one concern: the host-side response to the flags the step
read. It runs after the step's one host read and adds no sync of its own (an
event reads its numbers only when it happens).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from stableopt.emergency import EmergencyClip
from stableopt.errors import DivergenceError
from stableopt.lr import EmergencyLR, LRChange, PlateauLR, effective_lr
from stableopt.monitor import Monitor
from stableopt.rollback import Rollback
from stableopt.spike import SpikeGuard
from stableopt.stats import all_finite

__all__ = ["StepResponse"]


class StepResponse:
    """Mixin of :class:`~stableopt.SafeOptimizer`: the response to a step's outcome."""

    optimizer: Optimizer
    emergency_clip: EmergencyClip | None
    spike: SpikeGuard | None
    emergency_lr: EmergencyLR | None
    plateau: PlateauLR | None
    rollback: Rollback | None
    monitor: Monitor
    max_consecutive_failures: int
    check_weights: str
    _spike_streak: int
    param_groups: Any

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Provided by :class:`~stableopt.SafeOptimizer`."""

    def _finish(
        self,
        host: dict[str, bool],
        values: dict[str, float],
        ran: bool,
    ) -> None:
        """Count the outcome, escalate repeated spikes, move the LR factors, check the budget."""
        step = self.monitor.counters["steps"]
        weights_bad = ran and not host.get("weights_ok", True)
        if not weights_bad and self._weights_suspect(host):
            weights_bad = not bool(all_finite(self._all_params()))  # rare: suspect steps only
        if host.get("amp_overflow") and not weights_bad:
            # GradScaler's own overflow skip: its normal dynamics (it lowers the scale),
            # not a failure of the run: no streak, no LR cut, no history.
            self.monitor.count("scaler_skips")
            return
        grad_norm = values["grad_norm"]
        if weights_bad:
            host["weights_ok"] = False
            outcome = "rollback"
            cause = (
                "the update left non-finite weights"
                if ran and self.check_weights == "every_step"
                else "non-finite weights found (left by an earlier update)"
            )
            self._restore(f"{cause} (gradient norm {grad_norm:.4g})")
        elif not host["is_ok"]:
            outcome, cause = "skip", self._skip_cause(host, values)
            self.monitor.count("skipped_steps")
            self.monitor.event(
                "skip",
                f"{cause}: step skipped, weights and optimizer state unchanged",
                grad_norm=grad_norm,
            )
        else:
            outcome, cause = "ok", None
            self._count_good_step(host, values)

        is_spike = outcome == "skip" and (
            host.get("loss_spike", False) or host.get("grad_norm_spike", False)
        )
        if is_spike and self.spike is not None:
            self.monitor.count("spike_skips")
            self._spike_streak += 1
            if self._spike_streak == self.spike.cut_after:
                cause = f"{self._spike_streak} consecutive loss/gradient spikes"
            if self._spike_streak >= self.spike.rollback_after:
                self._restore(f"{self._spike_streak} consecutive spikes")
                self.spike.clear()  # a genuine change of regime is learned afresh
                self._spike_streak, outcome = 0, "rollback"
        elif outcome == "ok":
            self._spike_streak = 0

        trigger, immediate = self._lr_trigger(host, cause, grad_norm)
        if self.emergency_lr is not None:
            self._record_lr_change(
                self.emergency_lr.update(
                    step, trigger, is_healthy=outcome == "ok", immediate=immediate
                )
            )
            if self.emergency_lr.is_exhausted:
                self._raise_divergence(
                    f"{self.emergency_lr.emergency_cuts} emergency LR cuts without recovering in "
                    f"between (max_emergencies={self.emergency_lr.max_emergencies})"
                )
        if self.plateau is not None:
            if outcome != "ok" or trigger is not None:
                self.plateau.restart()
            self._record_lr_change(self.plateau.update())
        self.monitor.record_step(
            "emergency_clip" if outcome == "ok" and host.get("emergency_clip") else outcome
        )
        failures = self.monitor.counters["consecutive_failures"]
        if failures >= self.max_consecutive_failures:
            self._raise_divergence(
                f"{failures} consecutive steps were skipped or rolled back "
                f"(max_consecutive_failures={self.max_consecutive_failures})"
            )

    def _weights_suspect(self, host: dict[str, bool]) -> bool:
        """In lazy mode, when to look at the weights: a NaN weight shows up as
        non-finite gradients or loss at the next step, and a snapshot must never
        copy a corrupted state."""
        if self.check_weights == "off":
            return False
        if not host["grads_finite"] or not host.get("loss_finite", True):
            return True  # also with "every_step": weights corrupted between steps
        return self.check_weights == "lazy" and (
            host["is_ok"]
            and self.rollback is not None
            and self.rollback.is_due(self.monitor.counters["good_steps"] + 1)
        )

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _count_good_step(self, host: dict[str, bool], values: dict[str, float]) -> None:
        self.monitor.count("good_steps")
        if host.get("clipped"):
            self.monitor.count("total_clips")
        if host.get("emergency_clip"):
            self.monitor.count("emergency_clips")
            self.monitor.event(
                "emergency_clip",
                f"gradient norm {values['grad_norm']:.4g} is above the emergency threshold: "
                f"clipped to {values['clip_threshold']:.4g}",
                grad_norm=values["grad_norm"],
                clip_threshold=values["clip_threshold"],
            )
        if self.rollback is not None and self.rollback.is_due(self.monitor.counters["good_steps"]):
            self.rollback.take(self.optimizer, self.monitor.counters["steps"])

    def _skip_cause(self, host: dict[str, bool], values: dict[str, float]) -> str:
        grad_norm = values["grad_norm"]
        if not host["grads_finite"]:
            return f"gradient norm is {grad_norm} (NaN/Inf in the gradients)"
        if not host.get("loss_finite", True):
            return "the loss is NaN/Inf"
        if host.get("garbage"):
            limit = self.emergency_clip.skip_above if self.emergency_clip is not None else None
            return f"gradient norm {grad_norm:.4g} is above skip_above={limit}"
        if self.spike is not None and host.get("loss_spike"):
            z = self.spike.zscore("loss", values["loss"])
            return f"loss spike (robust z = {z:.3g} > {self.spike.z_threshold:g})"
        if self.spike is not None and host.get("grad_norm_spike"):
            z = self.spike.zscore("grad_norm", grad_norm)
            return (
                f"gradient-norm spike ({grad_norm:.4g}, robust z = {z:.3g} > "
                f"{self.spike.z_threshold:g})"
            )
        return f"step rejected (gradient norm {grad_norm:.4g})"

    def _lr_trigger(
        self, host: dict[str, bool], cause: str | None, grad_norm: float
    ) -> tuple[str | None, bool]:
        """Why the emergency LR policy should cut, or ``None``; and whether at once.

        At once (``True``) where the update itself failed: non-finite weights after
        it, or the spike guard's escalation. A bad batch (non-finite loss or
        gradients, a norm or loss above its threshold) cuts only when it repeats
        (:class:`~stableopt.EmergencyLR`'s ``min_triggers``).
        """
        if not host.get("weights_ok", True):
            return cause, True
        if not host["grads_finite"] or not host.get("loss_finite", True):
            return cause, False
        if host.get("grad_norm_above_threshold") and self.emergency_lr is not None:
            return (
                f"gradient norm {grad_norm:.4g} above {self.emergency_lr.grad_norm_threshold:g}",
                False,
            )
        if host.get("loss_above_threshold") and self.emergency_lr is not None:
            return f"loss above {self.emergency_lr.loss_threshold:g}", False
        if (
            self.spike is not None
            and cause is not None
            and self._spike_streak == self.spike.cut_after
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
            self._raise_divergence(f"{why}, and rollback is off: nothing good to restore")
        assert self.rollback is not None
        self.rollback.restore(self.optimizer)
        self.monitor.count("rollbacks")
        self.monitor.event(
            "rollback",
            f"{why}: weights and optimizer state restored to the snapshot of step {self.rollback.snapshot_step}",
            snapshot_step=float(self.rollback.snapshot_step or 0),
        )

    @property
    def lr_factor(self) -> float:
        """Our current LR multiplier: emergency factor x plateau factor (1.0 = none)."""
        factor = 1.0
        if self.emergency_lr is not None:
            factor *= self.emergency_lr.factor
        if self.plateau is not None:
            factor *= self.plateau.factor
        return factor

    def _lr_bounds(self) -> tuple[float, float | None]:
        min_lr = max(
            self.emergency_lr.min_lr if self.emergency_lr is not None else 0.0,
            self.plateau.min_lr if self.plateau is not None else 0.0,
        )
        return min_lr, self.plateau.max_lr if self.plateau is not None else None

    def effective_lr(self) -> list[Any]:
        """The LR each group's update uses: the scheduled ``group["lr"]`` times our factor.

        ``group["lr"]`` itself always shows the scheduled LR (what your scheduler wrote).
        """
        return [
            effective_lr(group["lr"], self.lr_factor, *self._lr_bounds())
            for group in self.param_groups
        ]

    def _raise_divergence(self, why: str) -> None:
        self.monitor.event("divergence", why)
        raise DivergenceError(
            f"stableopt: {why}. The weights are the last good ones. {self._summary()}",
            self.stats(),
            self.monitor.events(),
        )

    def _summary(self) -> str:
        counters = ", ".join(f"{k}={v}" for k, v in self.stats().items() if k in Monitor.COUNTERS)
        recent = "; ".join(
            f"step {e.step} {e.kind}: {e.reason}" for e in self.monitor.events()[-5:]
        )
        return f"Counters: {counters}. Last events: {recent}"
