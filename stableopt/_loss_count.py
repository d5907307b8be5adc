"""SafeLoss's counters and events, kept without waiting on the device.

:class:`DeviceCount` keeps the non-finite count on the device and lets the host learn
it without a sync; :class:`LossCounts` folds it, with the size mismatches, into the
loss's own stats and events and, when linked, into the optimizer's monitor.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import Any

import torch
from torch import Tensor

from stableopt._align import Mismatch
from stableopt.messages import event_text
from stableopt.monitor import Event
from stableopt.optimizer import SafeOptimizer
from stableopt.outcomes import EventKind

__all__ = ["DeviceCount", "LossCounts"]

_MAX_EVENTS = 256


class DeviceCount:
    """A count kept on the device; the host learns it without waiting.

    ``add`` is one in-place device add. ``poll`` never blocks: on CPU it reads the
    count (there is no device to wait for); on CUDA it folds the last non-blocking
    copy if its event has completed and starts a new one. ``read`` blocks.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.known = 0
        self._host: Tensor | None = None
        self._copied: Any = None  # a torch.cuda.Event while a copy is in flight

    def add(self, flag: Tensor) -> None:
        if self.total is None:
            self.total = torch.zeros((), dtype=torch.int64, device=flag.device)
        self.total.add_(flag.to(self.total.device))

    def poll(self) -> int:
        if self.total is None:
            return self.known
        if self.total.device.type != "cuda":
            return self.read()
        if self._copied is not None and self._copied.query():
            assert self._host is not None
            self.known = max(self.known, int(self._host))  # pinned host memory: no sync
            self._copied = None
        if self._copied is None:
            if self._host is None:
                self._host = torch.zeros((), dtype=torch.int64, pin_memory=True)
            self._host.copy_(self.total, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return self.known

    def read(self) -> int:
        if self.total is not None:
            self.known = int(self.total)
        return self.known


class LossCounts:
    """``nonfinite_losses``, ``size_mismatches``, ``expected_mismatches`` and the events of
    one SafeLoss.

    Linked to ``optimizer``, the counters are added to its monitor (present in
    ``opt.stats()`` from the start) and a step hook folds the device count after
    every ``opt.step()``. Standalone, events are logged to ``log``.
    """

    def __init__(self, optimizer: SafeOptimizer | None, log: logging.Logger) -> None:
        self.optimizer = optimizer
        self.nonfinite = DeviceCount()
        self._log = log
        self._nonfinite_folded = 0
        self._size_mismatches = 0
        self._expected_mismatches = 0  # declared by on_mismatch="expected": only counted
        self._nonfinite_base = 0  # non-finite losses counted before a resume
        self._skips_seen = 0
        self._events: deque[Event] = deque(maxlen=_MAX_EVENTS)
        _compile_outside_graph()
        if optimizer is not None:
            optimizer.accounting.loss_counters()
            self._skips_seen = optimizer.accounting.counter("skipped_steps")
            optimizer.register_step_post_hook(_after_step_hook(self))
            optimizer.register_load_state_dict_post_hook(_after_load_hook(self))

    def stats(self) -> dict[str, int]:
        self._fold(self._nonfinite_base + self.nonfinite.read())
        return {
            "nonfinite_losses": self._nonfinite_folded,
            "size_mismatches": self._size_mismatches,
            "expected_mismatches": self._expected_mismatches,
        }

    def events(self) -> list[Event]:
        self._fold(self._nonfinite_base + self.nonfinite.read())
        return list(self._events)

    def note_mismatch(self, mismatch: Mismatch, expected: bool = False) -> None:
        """Count a trimmed mismatch; an event at the 1st, 2nd, 4th, 8th, ... (outside any
        compiled graph: see :func:`_compile_outside_graph`). An ``expected`` one (the user
        declared it) is only counted, in ``expected_mismatches``."""
        if expected:
            self._expected_mismatches += 1
            if self.optimizer is not None:
                self.optimizer.accounting.expected_mismatch()
            return
        self._size_mismatches += 1
        count = self._size_mismatches
        told = count & (count - 1) == 0  # 1, 2, 4, 8, ...: a bounded log
        data = {
            "dim": float(mismatch.dim),
            "length": float(min(mismatch.pred_length, mismatch.target_length)),
            "pred_length": float(mismatch.pred_length),
            "target_length": float(mismatch.target_length),
            "size_mismatches": float(count),
        }
        labels = {
            "pred_shape": str(mismatch.pred_shape),
            "target_shape": str(mismatch.target_shape),
        }
        if self.optimizer is not None:
            event = self.optimizer.accounting.size_mismatch(told=told, data=data, labels=labels)
            if event is not None:
                self._events.append(event)
        elif told:
            self._standalone(EventKind.SIZE_MISMATCH, data, labels)

    def after_load(self) -> None:
        """After ``opt.load_state_dict``: the counts go on from the checkpoint's (the
        optimizer's counters, which hold what every linked loss counted)."""
        assert self.optimizer is not None
        counter = self.optimizer.accounting.counter
        self._nonfinite_base = counter("nonfinite_losses") - self.nonfinite.read()
        self._nonfinite_folded = counter("nonfinite_losses")
        self._size_mismatches = counter("size_mismatches")
        self._expected_mismatches = counter("expected_mismatches")
        self._skips_seen = counter("skipped_steps")

    def after_step(self) -> None:
        """After ``opt.step()``: bring the non-finite count to the optimizer's monitor."""
        assert self.optimizer is not None
        skipped = self.optimizer.accounting.counter("skipped_steps")
        was_skipped, self._skips_seen = skipped != self._skips_seen, skipped
        # The skip already cost a sync: read exactly then, never wait otherwise.
        seen = self.nonfinite.read() if was_skipped else self.nonfinite.poll()
        self._fold(self._nonfinite_base + seen)

    def _fold(self, count: int) -> None:
        previous = self._nonfinite_folded
        if count <= previous:
            return
        self._nonfinite_folded = count
        told = count.bit_length() > previous.bit_length()  # crossed 1, 2, 4, 8, ...
        if self.optimizer is not None:
            event = self.optimizer.accounting.nonfinite_losses(count - previous, count, told=told)
            if event is not None:
                self._events.append(event)
        elif told:
            data = {"nonfinite_losses": float(count), "since": float(count - previous)}
            self._standalone(EventKind.NONFINITE_LOSS, data, {})

    def _standalone(self, kind: EventKind, data: dict[str, float], labels: dict[str, str]) -> None:
        """An event of a SafeLoss with no optimizer: kept here and logged."""
        event = Event(0, kind.value, event_text(kind, None, data, labels), data, None, labels)
        self._log.warning("%s: %s", event.kind, event.reason)
        self._events.append(event)


def _after_step_hook(counts: LossCounts) -> Any:
    # A weak reference: the optimizer must not keep a discarded loss alive.
    ref = weakref.ref(counts)

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        target = ref()
        if target is not None:
            target.after_step()

    return after_step


def _after_load_hook(counts: LossCounts) -> Any:
    ref = weakref.ref(counts)

    def after_load(optimizer: Any) -> None:
        target = ref()
        if target is not None:
            target.after_load()

    return after_load


def _compile_outside_graph() -> None:
    """Host bookkeeping and logging happen only on a mismatch; under torch.compile they run
    outside the graph (one graph break, on the mismatch path only).

    ``torch.compiler.disable`` imports ``torch._dynamo`` (about as long as ``import torch``
    itself), so it is applied when the first SafeLoss is built, not when stableopt is
    imported. Once: the class attribute is replaced by the disabled function.
    """
    method = LossCounts.__dict__["note_mismatch"]
    if not getattr(method, "_outside_graph", False):
        disabled = torch.compiler.disable(method)
        disabled._outside_graph = True  # type: ignore[attr-defined]
        LossCounts.note_mismatch = disabled  # type: ignore[method-assign]
