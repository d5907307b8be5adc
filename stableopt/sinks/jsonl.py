"""A JSON-lines run log: one line per logged step and per event, flushed as written.

``python -m stableopt report RUN.jsonl`` (:mod:`stableopt.report`) draws it. The lines::

    {"type": "start", "time": 1732500000.0, "version": "0.1.0"}
    {"type": "metrics", "step": 50, "time": ..., "system_health": 1.0, "grad_norm": 0.41,
     "clip_threshold": null, "clipped_steps": [43, 47], ...}
    {"type": "event", "step": 61, "time": ..., "kind": "skip", "cause": "grad_norm_spike",
     "reason": "...", "data": {...}, "labels": {...}}

Metric lines carry every value of ``stats()`` (and ``loss`` when the metrics have
one), and ``clipped_steps``, the steps clipped since the previous metrics line.
Every number is a JSON number; the file is strict JSON, which has no NaN or
infinity, so a non-finite number (a NaN gradient norm, the ``inf`` clip threshold of
a step the policy did not clip) is written as ``null``, as is a value that does not
exist (no loss seen, clipping off). A numeric field is never a string.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from stableopt._checks import check_choice
from stableopt.monitor import Event
from stableopt.sinks._common import jsonable

__all__ = ["JsonlSink"]


class JsonlSink:
    """Write the run to a JSON-lines file.

    Every line is flushed to the operating system as it is written, so the file
    can be read (or drawn) while the run goes on, and a crash loses nothing
    already logged. Writing a line costs a few microseconds and no device sync
    (the monitor has already read the numbers).

    Args:
        path: the file (its parent directories are created).
        mode: ``"w"`` (default) starts a new file; ``"a"`` appends (a resumed run).
    """

    def __init__(self, path: str | Path, mode: str = "w") -> None:
        check_choice("mode", mode, ("w", "a"))
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open(mode, encoding="utf-8")
        from stableopt import __version__

        self._write({"type": "start", "time": time.time(), "version": __version__})

    def on_event(self, event: Event) -> None:
        """Write one ``"event"`` line."""
        self._write(
            {
                "type": "event",
                "step": event.step,
                "time": time.time(),
                "kind": event.kind,
                "cause": None if event.cause is None else event.cause.value,
                "reason": event.reason,
                "data": event.data,
                "labels": event.labels,
            }
        )

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one ``"metrics"`` line."""
        record: dict[str, Any] = {"type": "metrics", "step": step, "time": time.time()}
        record.update((k, v) for k, v in metrics.items() if k not in record)
        self._write(record)

    def close(self) -> None:
        """Close the file (a second call does nothing)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JsonlSink({str(self.path)!r}) is closed")
        self._file.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        self._file.flush()
