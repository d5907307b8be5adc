"""Exceptions raised by stableopt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stableopt.monitor import Event


class DivergenceError(RuntimeError):
    """The run could not be saved: too many consecutive failed steps.

    Raised by :meth:`stableopt.SafeOptimizer.step` after ``max_consecutive_failures``
    consecutive steps were skipped or rolled back. When it is raised, the parameters
    and the inner optimizer state are the last good ones (never the corrupted ones),
    so the model can still be saved or inspected.

    Attributes:
        stats: the counters at the time of the error (``SafeOptimizer.stats()``).
        events: the most recent events, oldest first.
    """

    def __init__(self, message: str, stats: Mapping[str, Any], events: Sequence[Event]) -> None:
        super().__init__(message)
        self.stats = dict(stats)
        self.events = list(events)
