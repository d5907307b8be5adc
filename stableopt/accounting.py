"""Accounting: the one writer of a run's counters and events.

The pipeline decides (:mod:`stableopt.response`), restores (:mod:`stableopt.restorer`) and
moves the LR (:mod:`stableopt.lr_control`); each outcome is written down here, as typed
data: a counter, and an :class:`~stableopt.monitor.Event` with an
:class:`~stableopt.outcomes.EventKind`, a cause, numbers and names (its sentence rendered by
:mod:`stableopt.messages`). :class:`~stableopt.SafeLoss` reports its own findings through
the same object (``opt.accounting``): nothing else writes into the monitor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stableopt.buffers import ModelBuffers
from stableopt.escalation import Action
from stableopt.messages import cause_text, event_text, skip_text
from stableopt.monitor import Event, Monitor
from stableopt.outcomes import AnyCause, Cause, EventKind, SkipReason
from stableopt.restorer import Restored
from stableopt.roles import LedgerRole
from stableopt.stages.lr_factor import LRChange
from stableopt.verdict import StepOutcome, StepStatus, StepVerdict

__all__ = ["Accounting", "Evidence"]


@dataclass(frozen=True)
class Evidence:
    """Why a step failed, as data: its :class:`SkipReason` and the numbers and names behind it
    (the norm, the loss, a spike's z-score, the module whose statistics grew, ...)."""

    cause: SkipReason | None
    data: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


class Accounting:
    """Count and record what each step did (see the module docstring).

    Args:
        monitor: where the counters and events are kept and sent.
    """

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        #: what the last step did in the end (``None`` before the first)
        self.last_outcome: StepOutcome | None = None

    @property
    def step(self) -> int:
        """The number of the current step (``step()`` calls so far)."""
        return self.monitor.counters["steps"]

    def begin_step(self) -> int:
        """A ``step()`` call starts; its number."""
        self.monitor.count("steps")
        return self.step

    # -- steps -----------------------------------------------------------------------------

    def accepted(self, verdict: StepVerdict, evidence: Evidence | None = None) -> None:
        """A step whose update is kept: counted, its clip counted, an emergency clip and a
        gradient-norm spike clipped to the spike guard's bound (``evidence``: its z) told."""
        self.monitor.count("good_steps")
        if verdict.is_clipped:
            self.monitor.count("total_clips")
            if not (verdict.is_spike_clipped or verdict.is_emergency):  # those are events
                data = {
                    "grad_norm": verdict.grad_norm,
                    "clip_threshold": float(verdict.clip_threshold or 0.0),
                    "clip_coefficient": verdict.clip_coefficient,
                }
                if verdict.clip_threshold is None or not math.isfinite(verdict.clip_threshold):
                    data = {"grad_norm": verdict.grad_norm}  # units rescaled in place (AGC)
                self.monitor.note("clip", event_text(EventKind.CLIP, None, data, {}))
        if verdict.is_spike_clipped:
            self.monitor.count("spike_clips")
            data = dict(evidence.data) if evidence is not None else {}
            data |= {
                "grad_norm": verdict.grad_norm,
                "clip_threshold": float(verdict.clip_threshold or 0.0),
                "clip_coefficient": verdict.clip_coefficient,
            }
            self.monitor.event(EventKind.CLIP, SkipReason.GRAD_NORM_SPIKE, data)
        if verdict.is_emergency:
            self.monitor.count("emergency_clips")
            self.monitor.event(
                EventKind.EMERGENCY_CLIP,
                Cause.ABOVE_EMERGENCY_THRESHOLD,
                {
                    "grad_norm": verdict.grad_norm,
                    "clip_threshold": float(verdict.clip_threshold or 0.0),
                },
            )

    def skipped(
        self, evidence: Evidence, *, reproduced: bool = False, buffers: bool = False
    ) -> None:
        """A skipped step: counted and told (``reproduced``: its re-run failed again;
        ``buffers``: the model's buffers were put back too)."""
        self.monitor.count("skipped_steps")
        data = dict(evidence.data)
        if reproduced:
            data["reproduced"] = 1.0
        if buffers:
            data["buffers"] = 1.0
        self.monitor.event(EventKind.SKIP, evidence.cause, data, evidence.labels)

    def counted_skip(self) -> None:
        """A skipped step told by another event (the rollback that follows it)."""
        self.monitor.count("skipped_steps")

    def spike(self) -> None:
        """A step that failed as a spike."""
        self.monitor.count("spike_skips")

    def scaler_skip(self) -> None:
        """GradScaler's own skip: its dynamics, not a failure of the run."""
        self.monitor.count("scaler_skips")

    def data_fault(self, evidence: Evidence, tag: Any, first_step: int | None) -> None:
        """A tagged batch (``tag``, its ids) failed again: skipped, a data fault, not a
        failure of the run (no streak)."""
        self.monitor.count("skipped_steps")
        self.monitor.count("data_faults")
        data = dict(evidence.data)
        if first_step is not None:
            data["first_step"] = float(first_step)
        ids = ", ".join(map(str, tag[:8])) + (", ..." if len(tag) > 8 else "")
        labels = {**evidence.labels, "batch": ids}
        self.monitor.event(EventKind.DATA_FAULT, evidence.cause, data, labels)
        self.monitor.record_step("skip")

    def rolled_back(
        self,
        cause: AnyCause,
        data: Mapping[str, float],
        labels: Mapping[str, str],
        restored: Restored,
    ) -> Event:
        """A rollback: counted and told, with what was restored."""
        self.monitor.count("rollbacks")
        numbers = {
            **data,
            "snapshot_step": float(restored.snapshot_step),
            "params": float(restored.params),
            "undone": float(restored.undone),
        }
        if restored.scope == "entries":
            numbers["entries"] = float(restored.entries)
        if restored.buffers:
            numbers["buffers"] = 1.0
        return self.monitor.event(
            EventKind.ROLLBACK, cause, numbers, {**labels, "scope": restored.scope}
        )

    def lr_changed(self, change: LRChange | None) -> None:
        """An LR factor moved (``None``: it did not)."""
        if change is None:
            return
        self.monitor.count("lr_changes")
        data = {**change.data, "old_factor": change.old_factor, "new_factor": change.new_factor}
        self.monitor.event(change.kind, change.cause, data, change.labels)

    def new_level(self, spikes: int, grad_norm: float) -> None:
        """A run of spikes at one level became the run's new level."""
        self.monitor.count("new_levels")
        self.monitor.event(
            EventKind.NEW_LEVEL,
            Cause.SPIKES_AT_ONE_LEVEL,
            {"spikes": float(spikes), "grad_norm": grad_norm},
        )

    def transient_fault(self, first: Evidence, grad_norm: float, devices: list[str]) -> None:
        """A failing step was healthy when evaluated again."""
        self.monitor.count("transient_faults")
        data = {f"first_{k}": v for k, v in first.data.items()}
        data["grad_norm"] = grad_norm
        labels = {**first.labels, "devices": ", ".join(devices)}
        if first.cause is not None:
            labels["first_cause"] = first.cause.value
        self.monitor.event(EventKind.TRANSIENT_FAULT, Cause.RERUN_HEALTHY, data, labels)

    def buffers_restored(
        self, buffers: ModelBuffers, bad: tuple[int, ...], *, skipped: bool
    ) -> None:
        """A forward pass left NaN/Inf in the model's ``buffers`` (``bad``: their indices;
        none: nothing to tell); they were put back."""
        if not bad:
            return
        modules = buffers.modules_of(bad)
        self.monitor.count("buffer_restores")
        self.monitor.event(
            EventKind.BUFFERS_RESTORED,
            Cause.SKIPPED_BATCH if skipped else Cause.ACCEPTED_STEP,
            {"modules": float(len(modules)), "buffers": float(len(bad)), "skipped": float(skipped)},
            {"module": modules[0], "kind": buffers.buffers[bad[0]].kind},
        )

    def diverged(
        self,
        cause: AnyCause,
        data: Mapping[str, float],
        labels: Mapping[str, str],
        lr_factor: float,
    ) -> Event:
        """The run stops: the event, and the step's outcome."""
        event = self.monitor.event(EventKind.DIVERGENCE, cause, data, labels)
        self.last_outcome = StepOutcome(
            step=self.step, status="stopped", reason=event.reason, lr_factor=lr_factor, cause=cause
        )
        return event

    def finished(self, action: Action, verdict: StepVerdict, consecutive_failures: int) -> None:
        """The step is over: its outcome for the health score, the failure streak after it."""
        severity = {Action.ACCEPT: "ok", Action.ROLLBACK: "rollback"}.get(action, "skip")
        if severity == "ok" and verdict.is_emergency:
            severity = "emergency_clip"
        self.monitor.record_step(severity)
        self.set_failures(consecutive_failures)

    def outcome(
        self,
        verdict: StepVerdict,
        status: StepStatus,
        evidence: Evidence,
        restored: tuple[AnyCause, Mapping[str, float], Mapping[str, str]] | None,
        lr_factor: float,
    ) -> StepOutcome:
        """What the step did in the end (``SafeOptimizer.last_step``): its status, and why as
        data (a rollback's cause, a skip's reason) and in words."""
        cause: AnyCause | None = None
        reason = None
        if status == "rolled_back" and restored is not None:
            cause = restored[0]
            reason = cause_text(*restored)
        elif status == "skipped":
            cause = evidence.cause
            reason = skip_text(evidence.cause, evidence.data, evidence.labels)
        self.last_outcome = StepOutcome(
            step=verdict.step,
            status=status,
            reason=reason,
            skip_reason=verdict.skip_reason,
            clip_coefficient=verdict.clip_coefficient if verdict.is_accepted else 1.0,
            is_clipped=verdict.is_clipped and verdict.is_accepted,
            lr_factor=lr_factor,
            cause=cause,
        )
        return self.last_outcome

    def ledger_entry(
        self, ledger: LedgerRole | None, verdict: StepVerdict, outcome: StepOutcome, tag: Any
    ) -> None:
        """A step whose update did not stand goes into the ledger, with its batch's tag."""
        if ledger is None or outcome.status == "updated":
            return
        ledger.record(
            verdict.step,
            outcome.status,
            outcome.reason or "",
            verdict.grad_norm,
            verdict.loss,
            tag,
            outcome.cause,
        )

    def set_failures(self, consecutive_failures: int) -> None:
        """The failure streak, as the escalation counts it."""
        self.monitor.counters["consecutive_failures"] = consecutive_failures

    # -- SafeLoss --------------------------------------------------------------------------

    def loss_counters(self) -> None:
        """Show SafeLoss's counters in ``stats()`` from the start (at 0)."""
        for name in ("nonfinite_losses", "size_mismatches", "expected_mismatches"):
            self.monitor.count(name, 0)

    def nonfinite_losses(self, added: int, total: int, *, told: bool) -> Event | None:
        """``added`` more non-finite losses (``total`` so far); an event when ``told``."""
        self.monitor.count("nonfinite_losses", added)
        if not told:
            return None
        return self.monitor.event(
            EventKind.NONFINITE_LOSS,
            None,
            {"nonfinite_losses": float(total), "since": float(added)},
        )

    def size_mismatch(
        self, *, told: bool, data: Mapping[str, float], labels: Mapping[str, str]
    ) -> Event | None:
        """One more trimmed length mismatch; an event when ``told``."""
        self.monitor.count("size_mismatches")
        if not told:
            return None
        # the loss is computed before its step() call: the event is the coming step's
        return self.monitor.event(EventKind.SIZE_MISMATCH, None, data, labels, step=self.step + 1)

    def expected_mismatch(self) -> None:
        """One more length mismatch the user declared expected: counted, nothing else."""
        self.monitor.count("expected_mismatches")

    def counter(self, name: str) -> int:
        """A counter's value (0 when absent)."""
        return int(self.monitor.counters.get(name, 0))
