"""A sink that logs the metrics and events to MLflow (optional extra ``mlflow``)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from stableopt.monitor import Event
from stableopt.sinks._common import metric_values, missing_extra

__all__ = ["MLflowSink"]

_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MLflowSink:
    """Log ``stats()`` to an MLflow run as ``stableopt/<name>`` metrics, in batches.

    Every ``Monitor(every_steps=...)`` steps, one ``log_batch`` call writes the
    metrics of :data:`stableopt.sinks.METRICS` (``stableopt/system_health``,
    ``stableopt/grad_norm``, ...; booleans as 0/1, missing counters as 0,
    ``None`` and non-finite values left out) at that step. Each event adds a
    ``stableopt/events/<kind>`` metric, the running count of that kind at the
    event's step, written with the next batch.

    By default the batches go through MLflow's asynchronous logging
    (``log_batch(..., synchronous=False)``): the training thread only enqueues
    them (a few ms, against tens of ms for a synchronous write to a SQLite
    store), and :meth:`close` waits until all are written.

    The run: ``run_id`` if given; otherwise the active run
    (``mlflow.start_run()``) when there is one and ``tracking_uri`` is not given or
    is the current one; otherwise the sink starts a run of its own in
    ``experiment_name``. It ends a run on :meth:`close` only if it started it.

    Args:
        tracking_uri: where the run lives (default: MLflow's current tracking URI),
            e.g. ``"sqlite:///runs/mlflow.db"``.
        experiment_name: the experiment of a run the sink starts (default
            ``"stableopt"``; created if missing).
        run_name: the name of a run the sink starts.
        run_id: log into this existing run (never ended by the sink).
        artifact_location: the artifact root of an experiment the sink creates
            (default MLflow's: ``./mlruns`` under the working directory for a
            database store).
        prefix: the prefix of every metric name (default ``"stableopt/"``).
        synchronous: write each batch before returning (default ``False``).

    Raises:
        ImportError: ``mlflow`` is not installed (``pip install 'stableopt[mlflow]'``).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment_name: str = "stableopt",
        run_name: str | None = None,
        run_id: str | None = None,
        artifact_location: str | None = None,
        prefix: str = "stableopt/",
        synchronous: bool = False,
    ) -> None:
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise missing_extra("mlflow", "mlflow", "MLflowSink") from exc
        self.prefix = prefix
        self.synchronous = bool(synchronous)
        self._operations: list[Any] = []  # asynchronous batches not yet waited for
        self._pending: list[Any] = []
        self._event_counts: dict[str, int] = {}
        with _quiet_mlflow():  # creating a store logs its INFO lines
            self._client = MlflowClient(tracking_uri)
            active = mlflow.active_run()
            same_store = tracking_uri is None or tracking_uri == mlflow.get_tracking_uri()
            if run_id is not None:
                self.run_id, self.owns_run = run_id, False
            elif active is not None and same_store:
                self.run_id, self.owns_run = active.info.run_id, False
            else:
                experiment = self._client.get_experiment_by_name(experiment_name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else self._client.create_experiment(
                        experiment_name, artifact_location=artifact_location
                    )
                )
                run = self._client.create_run(experiment_id, run_name=run_name)
                self.run_id, self.owns_run = run.info.run_id, True

    def on_event(self, event: Event) -> None:
        """Count the event; its metric goes out with the next batch."""
        from mlflow.entities import Metric

        count = self._event_counts.get(event.kind, 0) + 1
        self._event_counts[event.kind] = count
        self._pending.append(
            Metric(f"{self.prefix}events/{event.kind}", float(count), _now_ms(), event.step)
        )

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write the metrics of this step and the pending event counts in one batch."""
        from mlflow.entities import Metric

        timestamp = _now_ms()
        self._pending += [
            Metric(self.prefix + name, value, timestamp, step)
            for name, value in metric_values(metrics).items()
        ]
        self._flush()

    def close(self) -> None:
        """Write what is pending and wait for it; end the run if the sink started it."""
        with _quiet_mlflow():
            self._flush()
            operations, self._operations = self._operations, []
            for operation in operations:
                operation.wait()
            if self.owns_run:
                self._client.set_terminated(self.run_id, "FINISHED")
                self.owns_run = False

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), _BATCH):
            batch = pending[start : start + _BATCH]
            if self.synchronous:
                self._client.log_batch(self.run_id, metrics=batch)
            else:
                self._operations.append(
                    self._client.log_batch(self.run_id, metrics=batch, synchronous=False)
                )


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's own INFO lines ("Creating initial MLflow database tables...") kept off the
    console during our calls: its ``mlflow`` logger (which prints to stderr itself and
    does not propagate) is raised to WARNING meanwhile, and restored after. The root
    logger and the user's handlers are not touched; a level the user set at WARNING or
    above stays as it is."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
