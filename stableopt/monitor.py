"""Counters, events and the health score of a run.

Every intervention is one :class:`Event` (step, kind, reason, numbers). Events are
kept in a bounded buffer and logged under the ``stableopt`` logger, the first 5
of each kind and then every 100th, so a run that skips thousands of steps does not
flood its log; the 5th of a kind says so. Every event still reaches the counters,
:meth:`Monitor.events` and every sink.

Steps are counted from 1: an event's ``step`` is the number of ``step()`` calls so far,
the skipped ones included, so the first ``step()`` is step 1 and the call in iteration
``i`` of a loop that counts from 0 is step ``i + 1``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Protocol

from stableopt._checks import check_int
from stableopt.messages import event_text
from stableopt.outcomes import AnyCause, parse_cause

__all__ = ["SEVERITY", "Event", "Monitor", "Sink"]

log = logging.getLogger(__name__)

#: How much each outcome of a step costs the health score (0 = healthy step).
SEVERITY: dict[str, float] = {
    "ok": 0.0,
    "emergency_clip": 0.5,
    "skip": 1.0,
    "rollback": 1.0,
}

_LOG_FIRST = 5
_LOG_EVERY = 100


class Sink(Protocol):
    """Where events and metrics go (MLflow, TensorBoard, a run log, a notifier)."""

    def on_event(self, event: Event) -> None:
        """Called once per event, as it happens."""

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Called every ``every_steps`` steps with the values of ``stats()``, plus
        ``clipped_steps``: the steps clipped since the previous call (a list of ints)."""

    def close(self) -> None:
        """Flush and release resources."""


@dataclass(frozen=True)
class Event:
    """One intervention.

    Attributes:
        step: the step it happened at, counted from 1: the number of ``step()`` calls
            so far, skipped ones included (``stats()["steps"]`` at that moment). The
            ``step()`` of loop iteration ``i`` (from 0) is step ``i + 1``. torch's own
            ``optimizer.state[p]["step"]`` counts the updates that ran instead: the two
            agree until the first skipped step.
        kind: what happened: an :class:`~stableopt.outcomes.EventKind` (``"skip"``,
            ``"rollback"``, ``"divergence"``, ...; a ``str`` enum, equal to its string).
        reason: the sentence a person reads, rendered from the rest
            (:mod:`stableopt.messages`): for logs and sinks, never for deciding.
        data: the numbers behind the decision, by name.
        cause: why: a :class:`~stableopt.outcomes.Cause`, or the
            :class:`~stableopt.verdict.SkipReason` of a skip (``None``: none given).
        labels: names behind it (a module's path, a batch's ids, a rule's name), by name.
    """

    step: int
    kind: str
    reason: str
    data: dict[str, float] = field(default_factory=dict)
    cause: AnyCause | None = None
    labels: dict[str, str] = field(default_factory=dict)


class Monitor:
    """Counts steps and interventions, keeps recent events, and scores health.

    Health is ``1 - mean(severity)`` over the last ``health_window`` steps, with
    the severities in :data:`SEVERITY` (a skipped or rolled-back step costs 1, an
    emergency clip 0.5, any other step 0). It is 1.0 before the first step.

    Sinks (MLflow, TensorBoard, a JSON-lines run log, notifiers; see
    :mod:`stableopt.sinks`) receive every event as it happens and the metrics of
    ``stats()`` every ``every_steps`` steps, with ``clipped_steps``: the steps whose
    gradients were clipped since the last metrics (a clip is too common to be an
    event; the run log keeps them so that the report can mark them). Reading the
    metrics may sync the device, so it happens only on those steps. A sink that
    raises is logged (rate-limited) and never stops training.

    Event log lines are rate-limited per kind: the first 5, then every 100th; the
    5th says that the rest are thinned out.

    Args:
        max_events: how many recent events :meth:`events` keeps (default 256).
        health_window: how many recent steps the health score reads (default 100).
        sinks: objects with ``on_event(event)``, ``on_metrics(step, metrics)`` and
            ``close()`` (see :class:`Sink`); default none (events still go to the
            ``stableopt`` logger).
        every_steps: how often sinks get the metrics (default 50, ``>= 1``).
    """

    COUNTERS = (
        "steps",
        "good_steps",
        "skipped_steps",
        "spike_skips",
        "scaler_skips",
        "rollbacks",
        "new_levels",
        "total_clips",
        "emergency_clips",
        "spike_clips",
        "lr_changes",
        "transient_faults",
        "data_faults",
        "buffer_restores",
        "consecutive_failures",
    )

    def __init__(
        self,
        max_events: int = 256,
        health_window: int = 100,
        sinks: Iterable[Sink] = (),
        every_steps: int = 50,
    ) -> None:
        self.max_events = check_int("max_events", max_events, minimum=1)
        self.health_window = check_int("health_window", health_window, minimum=1)
        self.every_steps = check_int("every_steps", every_steps, minimum=1)
        self.sinks: list[Sink] = list(sinks)
        for sink in self.sinks:
            if not all(
                callable(getattr(sink, name, None)) for name in ("on_event", "on_metrics", "close")
            ):
                raise TypeError(
                    f"sinks must have on_event, on_metrics and close methods, got {type(sink).__name__}"
                )
        self._sink_failures: dict[str, int] = {}
        self.counters: dict[str, int] = dict.fromkeys(self.COUNTERS, 0)
        self._events: deque[Event] = deque(maxlen=self.max_events)
        self._severities: deque[float] = deque(maxlen=self.health_window)
        self._kind_counts: dict[str, int] = {}
        self._clipped_steps: list[int] = []  # since the last metrics handed to the sinks

    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name``."""
        self.counters[name] = self.counters.get(name, 0) + amount
        if name == "total_clips" and self.sinks:
            # which steps clipped goes to the sinks with the next metrics (at most
            # every_steps entries: the list is handed over and emptied then)
            self._clipped_steps.append(self.counters["steps"])

    def record_step(self, outcome: str) -> None:
        """Record one finished step whose outcome is a key of :data:`SEVERITY`."""
        self._severities.append(SEVERITY[outcome])

    def event(
        self,
        kind: str,
        cause: AnyCause | None = None,
        data: Mapping[str, float] | None = None,
        labels: Mapping[str, str] | None = None,
        step: int | None = None,
    ) -> Event:
        """Record an event at the current step (or at ``step``: the coming one, for what
        happens before its ``step()`` call), its reason rendered from ``kind``, ``cause``,
        ``data`` and ``labels`` (:func:`stableopt.messages.event_text`), and log it
        (rate-limited per kind)."""
        numbers, names = dict(data or {}), dict(labels or {})
        kind = kind.value if isinstance(kind, Enum) else str(kind)  # a plain string to keep
        event = Event(
            self.counters["steps"] if step is None else step,
            kind,
            event_text(kind, cause, numbers, names),
            numbers,
            cause,
            names,
        )
        self._events.append(event)
        seen = self._kind_counts.get(kind, 0) + 1
        self._kind_counts[kind] = seen
        if seen <= _LOG_FIRST or seen % _LOG_EVERY == 0:
            suffix = f" ({seen} {kind} events so far)" if seen > _LOG_FIRST else ""
            log.warning("step %d: %s: %s%s", event.step, kind, event.reason, suffix)
        if seen == _LOG_FIRST:  # say once per kind that the log thins out from here
            sinks = ", and every one reaches the sinks" if self.sinks else ""
            log.warning(
                "%s: further %s events are logged only every %dth; all of them are counted "
                "in stats(), the recent ones are in events()%s",
                kind,
                kind,
                _LOG_EVERY,
                sinks,
            )
        for sink in self.sinks:
            self._call(sink, "on_event", event)
        return event

    def note(self, kind: str, text: str) -> None:
        """Log ``text`` under ``kind`` at the current step, rate-limited like the events of a
        kind (the first 5, then every 100th), without keeping an event: for what is too
        common to be one (a clipped step)."""
        seen = self._kind_counts.get(kind, 0) + 1
        self._kind_counts[kind] = seen
        if seen <= _LOG_FIRST or seen % _LOG_EVERY == 0:
            suffix = f" ({seen} {kind} so far)" if seen > _LOG_FIRST else ""
            log.warning("step %d: %s: %s%s", self.counters["steps"], kind, text, suffix)
        if seen == _LOG_FIRST:
            log.warning(
                "%s: further ones are logged only every %dth; all are counted in stats()",
                kind,
                _LOG_EVERY,
            )

    def end_step(self, metrics: Callable[[], Mapping[str, Any]]) -> None:
        """After a step: every ``every_steps`` steps, give the sinks ``metrics()``.

        ``metrics`` is called only then (reading it may sync the device).
        """
        step = self.counters["steps"]
        if not self.sinks or step % self.every_steps:
            return
        values = {**metrics(), "clipped_steps": self._clipped_steps}
        self._clipped_steps = []
        for sink in self.sinks:
            self._call(sink, "on_metrics", step, values)

    def close(self) -> None:
        """Flush and close every sink."""
        for sink in self.sinks:
            self._call(sink, "close")

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:  # a failing sink must never stop training
            name = type(sink).__name__
            failures = self._sink_failures.get(name, 0) + 1
            self._sink_failures[name] = failures
            if failures <= _LOG_FIRST or failures % _LOG_EVERY == 0:
                log.exception(
                    "sink %s failed in %s (failure %d); training goes on", name, method, failures
                )
            if failures == _LOG_FIRST:
                log.warning(
                    "sink %s: further failures are logged only every %dth", name, _LOG_EVERY
                )

    def events(self) -> list[Event]:
        """The recent events, oldest first."""
        return list(self._events)

    @property
    def health(self) -> float:
        """The health score in [0, 1]."""
        if not self._severities:
            return 1.0
        return max(0.0, 1.0 - sum(self._severities) / len(self._severities))

    def state_dict(self) -> dict[str, Any]:
        """Counters, recent severities and events as plain data."""
        return {
            "counters": dict(self.counters),
            "severities": list(self._severities),
            "events": [
                {**asdict(e), "cause": None if e.cause is None else e.cause.value}
                for e in self._events
            ],
            "kind_counts": dict(self._kind_counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.counters = dict.fromkeys(self.COUNTERS, 0) | dict(state_dict["counters"])
        self._severities = deque(state_dict["severities"], maxlen=self.health_window)
        self._events = deque(
            (
                Event(
                    int(e["step"]),
                    str(e["kind"]),
                    str(e["reason"]),
                    dict(e.get("data", {})),
                    parse_cause(e.get("cause")),
                    dict(e.get("labels", {})),
                )
                for e in state_dict["events"]
            ),
            maxlen=self.max_events,
        )
        self._kind_counts = dict(state_dict["kind_counts"])
