"""A sink that writes the metrics and events to TensorBoard (optional extra ``tensorboard``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stableopt.monitor import Event
from stableopt.sinks._common import metric_values, missing_extra

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Write ``stats()`` as ``stableopt/<name>`` scalars and each event as a text summary.

    Scalars are the metrics of :data:`stableopt.sinks.METRICS` (booleans as 0/1,
    missing counters as 0, ``None`` and non-finite values left out); an event is a
    text summary under ``stableopt/events/<kind>`` at its step: ``step 61: <reason>``.
    ``SummaryWriter`` queues the records for its own writer thread, so a call costs
    microseconds and no I/O on the training thread.

    Args:
        log_dir: the directory of the event file (default: ``SummaryWriter``'s,
            ``runs/<date>_<host>``). Ignored when ``writer`` is given.
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` to write into
            (flushed but not closed by :meth:`close`: it is yours).
        prefix: the prefix of every tag (default ``"stableopt/"``).

    Raises:
        ImportError: ``tensorboard`` is not installed (``pip install 'stableopt[tensorboard]'``).
    """

    def __init__(
        self, log_dir: str | Path | None = None, *, writer: Any = None, prefix: str = "stableopt/"
    ) -> None:
        self.prefix = prefix
        self.owns_writer = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise missing_extra("tensorboard", "tensorboard", "TensorBoardSink") from exc
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer

    @property
    def log_dir(self) -> str:
        """Where the event file is."""
        return str(self.writer.get_logdir())

    def on_event(self, event: Event) -> None:
        """Add the event as a text summary at its step."""
        self.writer.add_text(
            f"{self.prefix}events/{event.kind}", f"step {event.step}: {event.reason}", event.step
        )

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Add one scalar per metric at ``step``."""
        for name, value in metric_values(metrics).items():
            self.writer.add_scalar(self.prefix + name, value, step)

    def close(self) -> None:
        """Flush; close the writer if the sink made it."""
        self.writer.flush()
        if self.owns_writer:
            self.writer.close()
