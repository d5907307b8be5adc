"""Where the monitor's events and metrics go: logging, a JSON-lines run log, MLflow,
TensorBoard, and notifiers (a webhook, Telegram).

Each sink has ``on_event(event)``, ``on_metrics(step, metrics)`` and ``close()``
(the :class:`~stableopt.monitor.Sink` protocol); pass them to the monitor::

    opt = SafeOptimizer(inner, monitor=Monitor(sinks=[JsonlSink("run.jsonl")], every_steps=50))

A sink that raises is logged and skipped by the monitor: it never stops training.
The optional packages (``mlflow``, ``tensorboard``) are imported only when their
sink is built, and a missing one raises an :class:`ImportError` naming the extra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from stableopt.monitor import Sink
from stableopt.sinks._common import METRICS, metric_values
from stableopt.sinks.jsonl import JsonlSink
from stableopt.sinks.log_sink import LoggingSink
from stableopt.sinks.mlflow import MLflowSink
from stableopt.sinks.notify import DEFAULT_NOTIFY_KINDS, Notifier, TelegramSink, WebhookSink
from stableopt.sinks.tensorboard import TensorBoardSink

__all__ = [
    "DEFAULT_NOTIFY_KINDS",
    "METRICS",
    "JsonlSink",
    "LoggingSink",
    "MLflowSink",
    "Notifier",
    "TelegramSink",
    "TensorBoardSink",
    "WebhookSink",
    "default_sinks",
    "metric_values",
]

log = logging.getLogger(__name__)

#: The file names :func:`default_sinks` uses inside its directory.
RUN_LOG = "run.jsonl"
MLFLOW_DB = "mlflow.db"
TENSORBOARD_DIR = "tensorboard"


def default_sinks(
    log_dir: str | Path,
    *,
    run_name: str | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> list[Sink]:
    """The sinks of a run directory: a JSON-lines run log, MLflow and TensorBoard.

    Inside ``log_dir`` (created if missing):

    - ``run.jsonl``: :class:`JsonlSink` (always; ``python -m stableopt report`` draws it);
    - ``mlflow.db``: :class:`MLflowSink` into a SQLite MLflow store, experiment
      ``"stableopt"``, artifacts under ``mlartifacts/``; browse it with
      ``mlflow ui --backend-store-uri sqlite:///LOG_DIR/mlflow.db``. (SQLite, not a
      ``file:`` store: MLflow 3 refuses new file stores unless
      ``MLFLOW_ALLOW_FILE_STORE=true``. Creating the database takes a few seconds.)
    - ``tensorboard/``: :class:`TensorBoardSink` (``tensorboard --logdir LOG_DIR/tensorboard``).

    A sink whose optional package is missing is left out with a logged warning
    naming the extra to install; so is one that fails to start (a locked database).

    Args:
        log_dir: the run directory.
        run_name: the name of the MLflow run.
        on_skip: called as ``on_skip(name, reason)`` for each sink left out
            (``"MLflow"`` or ``"TensorBoard"``, and the error, which names the
            ``pip install`` command of a missing extra), besides the warning; for a
            command that tells its user what it did not write.
    """
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = [JsonlSink(directory / RUN_LOG)]
    builders: list[tuple[str, Callable[[], Sink]]] = [
        (
            "MLflow",
            lambda: MLflowSink(
                f"sqlite:///{(directory / MLFLOW_DB).resolve().as_posix()}",
                run_name=run_name,
                artifact_location=(directory / "mlartifacts").resolve().as_uri(),
            ),
        ),
        ("TensorBoard", lambda: TensorBoardSink(directory / TENSORBOARD_DIR)),
    ]
    for name, build in builders:
        try:
            sinks.append(build())
        except Exception as exc:  # a missing extra or a broken store must not stop the run
            reason = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            log.warning("no %s logging for %s: %s", name, directory, reason)
            if on_skip is not None:
                on_skip(name, reason)
    return sinks
