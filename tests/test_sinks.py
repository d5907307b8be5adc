"""Sinks against the real thing: a JSON-lines file read back, a SQLite MLflow store read back
with MlflowClient, a TensorBoard event file read back with EventAccumulator, and a real HTTP
server on 127.0.0.1 for the notifiers. Every run is a real SafeOptimizer run with faults."""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stableopt.monitor import Event
from stableopt.sinks import (
    DEFAULT_NOTIFY_KINDS,
    METRICS,
    JsonlSink,
    LoggingSink,
    MLflowSink,
    TelegramSink,
    TensorBoardSink,
    WebhookSink,
    default_sinks,
    metric_values,
)
from tests.test_recommend import one_thread, train  # noqa: F401  (one_thread: autouse fixture)

FAULTS: dict[int, Any] = {25: "nan_grad", 45: "grad_spike", 70: "nan_weights"}

#: The metric names MLflow and TensorBoard must carry (the issue's list, spelled out here).
STABLE_NAMES = [
    "stableopt/system_health",
    "stableopt/emergency_mode",
    "stableopt/total_clips",
    "stableopt/emergency_clips",
    "stableopt/lr_changes",
    "stableopt/skipped_steps",
    "stableopt/rollbacks",
    "stableopt/size_mismatches",
    "stableopt/grad_norm",
    "stableopt/clip_threshold",
    "stableopt/lr_factor",
]


class RecordingSink:
    """Counts the calls: the independent record the other sinks are compared with."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, Any]]] = []
        self.events: list[Event] = []
        self.closed = 0

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.metrics.append((step, dict(metrics)))

    def close(self) -> None:
        self.closed += 1


# -- the monitor's cadence ------------------------------------------------------------------


def test_metrics_reach_sinks_only_every_n_steps_and_stats_is_read_only_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stableopt import SafeOptimizer

    calls = []
    original = SafeOptimizer.stats

    def counting_stats(self: SafeOptimizer) -> dict[str, Any]:
        calls.append(self.monitor.counters["steps"])
        return original(self)

    monkeypatch.setattr(SafeOptimizer, "stats", counting_stats)
    recorder = RecordingSink()
    opt = train(50, {20: "nan_grad"}, sinks=[recorder], every_steps=7)
    assert [step for step, _ in recorder.metrics] == [7, 14, 21, 28, 35, 42, 49]
    assert calls[:7] == [7, 14, 21, 28, 35, 42, 49]  # stats() (a possible sync) only then
    assert recorder.events == opt.events()  # every event, as it happened
    assert recorder.closed == 1


def test_metric_values_use_stable_names_and_numbers() -> None:
    values = metric_values(
        {"system_health": 0.5, "emergency_mode": True, "grad_norm": None, "clip_threshold": 2}
    )
    assert values["emergency_mode"] == 1.0 and values["clip_threshold"] == 2.0
    assert "grad_norm" not in values and "loss" not in values  # None / absent: left out
    assert values["size_mismatches"] == 0.0  # a missing counter is 0
    assert metric_values({"grad_norm": float("nan"), "loss": 1.5}).get("grad_norm") is None
    assert metric_values({"loss": 1.5})["loss"] == 1.5
    assert {f"stableopt/{m}" for m in METRICS} >= set(STABLE_NAMES)


# -- logging and JSON lines --------------------------------------------------------------------


def test_logging_sink_logs_every_nth_metric_step(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stableopt")
    recorder = RecordingSink()
    train(60, FAULTS, sinks=[recorder, LoggingSink(every_steps=20)], every_steps=10)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    lines = [line for line in lines if "health" in line]
    assert [line.split(":")[0] for line in lines] == ["step 20", "step 40", "step 60"]
    stats = dict(recorder.metrics)[40]
    assert f"health {stats['system_health']:.3f}" in lines[1]
    assert f"skipped {stats['skipped_steps']}" in lines[1]


def test_jsonl_sink_writes_strict_json_lines_of_metrics_and_events(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "run.jsonl"
    recorder = RecordingSink()
    opt = train(80, FAULTS, sinks=[recorder, JsonlSink(path)], every_steps=10)

    def reject(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    records = [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]
    assert records[0]["type"] == "start"
    metrics = [r for r in records if r["type"] == "metrics"]
    assert [r["step"] for r in metrics] == list(range(10, 81, 10))
    for record, (step, stats) in zip(metrics, recorder.metrics):
        assert record["step"] == step
        assert record["skipped_steps"] == stats["skipped_steps"]
        assert record["system_health"] == stats["system_health"]
    events = [r for r in records if r["type"] == "event"]
    assert [(e["step"], e["kind"], e["reason"]) for e in events] == [
        (e.step, e.kind, e.reason) for e in opt.events()
    ]
    nan_skip = next(e for e in events if e["step"] == 25 and e["kind"] == "skip")
    assert nan_skip["data"]["grad_norm"] is None  # strict JSON: a non-finite number is null


def test_a_failing_sink_logs_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")
    broken = JsonlSink(tmp_path / "run.jsonl")
    broken.close()  # every later write raises ValueError
    recorder = RecordingSink()
    opt = train(60, FAULTS, sinks=[broken, recorder], every_steps=10)
    assert opt.stats()["steps"] == 60 and len(recorder.metrics) == 6
    assert "sink JsonlSink failed" in caplog.text


# -- MLflow -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory (and one SQLite MLflow store: creating one takes seconds) per module."""
    return tmp_path_factory.mktemp("runs")


def _sqlite_uri(log_dir: Path) -> str:
    return f"sqlite:///{(log_dir / 'mlflow.db').as_posix()}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mlflow_sink_logs_stable_metric_names_into_its_own_run(log_dir: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    recorder = RecordingSink()
    sink = MLflowSink(
        _sqlite_uri(log_dir),
        experiment_name="sinks",
        run_name="faulty",
        artifact_location=(log_dir / "art").as_uri(),
    )
    assert sink.owns_run
    # A fixed clip: its threshold is finite on every step (ZClip's is inf while it is not clipping).
    opt = train(80, FAULTS, sinks=[recorder, sink], every_steps=10, clip=1.0)

    client = MlflowClient(_sqlite_uri(log_dir))
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "faulty"
    for name in STABLE_NAMES:
        key = name.removeprefix("stableopt/")
        expected = [  # missing counters as 0, bools as 0/1, None and inf left out
            (step, float(stats.get(key, 0)))
            for step, stats in recorder.metrics
            if stats.get(key, 0) is not None and math.isfinite(stats.get(key, 0))
        ]
        history = sorted((m.step, m.value) for m in client.get_metric_history(sink.run_id, name))
        assert [h[0] for h in history] == [e[0] for e in expected], name
        assert [h[1] for h in history] == pytest.approx([e[1] for e in expected]), name
        assert len(history) == 8, name
    rollbacks = client.get_metric_history(sink.run_id, "stableopt/events/rollback")
    assert [(m.step, m.value) for m in rollbacks] == [
        (e.step, 1.0) for e in opt.events() if e.kind == "rollback"
    ]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mlflow_sink_joins_the_active_run_and_leaves_it_open(log_dir: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(_sqlite_uri(log_dir))
    try:
        mlflow.set_experiment("active")
        with mlflow.start_run() as active:
            sink = MLflowSink(synchronous=True)
            assert sink.run_id == active.info.run_id and not sink.owns_run
            train(20, sinks=[sink], every_steps=10)
            assert mlflow.active_run() is not None  # close() did not end the user's run
            client = mlflow.tracking.MlflowClient()
            assert client.get_run(active.info.run_id).info.status == "RUNNING"
            history = client.get_metric_history(active.info.run_id, "stableopt/lr_factor")
            assert [m.step for m in history] == [10, 20]
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_default_sinks_build_jsonl_mlflow_and_tensorboard(log_dir: Path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    sinks = default_sinks(log_dir, run_name="defaults")
    assert [type(s) for s in sinks] == [JsonlSink, MLflowSink, TensorBoardSink]
    train(20, sinks=sinks, every_steps=10)
    assert (log_dir / "run.jsonl").stat().st_size > 0
    assert (log_dir / "mlflow.db").exists()
    assert any((log_dir / "tensorboard").glob("events.out.tfevents.*"))
    mlflow_sink = sinks[1]
    assert isinstance(mlflow_sink, MLflowSink)
    experiment = mlflow_sink._client.get_experiment_by_name("stableopt")
    assert experiment is not None
    assert experiment.artifact_location.startswith(log_dir.resolve().as_uri())  # not ./mlruns


def test_missing_optional_packages_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")  # the CLI's tests may have raised it
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"stableopt\[mlflow\]"):
        MLflowSink()
    with pytest.raises(ImportError, match=r"stableopt\[tensorboard\]"):
        TensorBoardSink(tmp_path)
    sinks = default_sinks(tmp_path)
    assert [type(s) for s in sinks] == [JsonlSink]
    assert "stableopt[mlflow]" in caplog.text and "stableopt[tensorboard]" in caplog.text
    sinks[0].close()


# -- TensorBoard --------------------------------------------------------------------------------


def test_tensorboard_sink_writes_scalars_and_events_as_text(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = RecordingSink()
    opt = train(80, FAULTS, sinks=[recorder, TensorBoardSink(tmp_path)], every_steps=10, clip=1.0)
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert scalars >= set(STABLE_NAMES)
    health = accumulator.Scalars("stableopt/system_health")
    assert [s.step for s in health] == [step for step, _ in recorder.metrics]
    assert [s.value for s in health] == pytest.approx(  # stored as float32
        [m["system_health"] for _, m in recorder.metrics], rel=1e-6
    )
    texts = accumulator.Tensors("stableopt/events/rollback/text_summary")
    (rollback,) = [e for e in opt.events() if e.kind == "rollback"]
    assert [(t.step, t.tensor_proto.string_val[0].decode()) for t in texts] == [
        (rollback.step, f"step {rollback.step}: {rollback.reason}")
    ]


# -- notifiers ----------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.release = threading.Event()
        self.release.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.release.wait(10)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.requests.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


def test_webhook_notifies_a_real_run_once_per_kind(receiver: Receiver) -> None:
    sink = WebhookSink(f"{receiver.url}/hook", min_interval_s=3600, run_name="demo")
    # two corrupting updates: rollback and lr_cut repeat, and the repeats are rate-limited
    opt = train(80, {**FAULTS, 60: "nan_weights"}, sinks=[sink], check_weights="every_step")
    notifying = [e for e in opt.events() if e.kind in DEFAULT_NOTIFY_KINDS]
    first: dict[str, Event] = {}
    for event in notifying:
        first.setdefault(event.kind, event)
    assert sink.sent == len(first) and sink.failed == 0
    assert sink.rate_limited == len(notifying) - len(first) > 0  # the repeats were dropped
    bodies = sorted((body for _, body in receiver.requests), key=lambda b: (b["step"], b["kind"]))
    expected = sorted(first.values(), key=lambda e: (e.step, e.kind))
    assert [(b["step"], b["kind"], b["reason"]) for b in bodies] == [
        (e.step, e.kind, e.reason) for e in expected
    ]
    assert {path for path, _ in receiver.requests} == {"/hook"}
    assert all(b["text"].startswith("[demo] stableopt: step ") for b in bodies)
    assert all(b["source"] == "stableopt" and b["suppressed"] == 0 for b in bodies)


def test_rate_limit_drops_repeats_and_counts_them_in_the_next_message(
    receiver: Receiver,
) -> None:
    sink = WebhookSink(receiver.url, min_interval_s=3600)
    for step in range(1, 6):
        sink.on_event(Event(step, "rollback", "weights were NaN", {"snapshot_step": 0.0}))
    sink.on_event(Event(6, "lr_cut", "cut", {}))
    sink.on_event(Event(7, "skip", "not a notifying kind", {}))
    sink.close()
    assert [(b["step"], b["kind"]) for _, b in receiver.requests] == [
        (1, "rollback"),
        (6, "lr_cut"),
    ]
    assert sink.rate_limited == 4 and sink.sent == 2
    assert "4 more rollback event(s)" in sink.message(Event(9, "rollback", "again"), 4)


def test_sending_never_blocks_training_and_a_full_queue_drops(receiver: Receiver) -> None:
    receiver.release.clear()  # the server hangs until released
    sink = WebhookSink(receiver.url, min_interval_s=0, queue_size=2, timeout_s=10)
    started = time.perf_counter()
    for step in range(1, 11):
        sink.on_event(Event(step, "rollback", "weights were NaN"))
    assert time.perf_counter() - started < 0.5  # enqueued, not sent, on this thread
    assert sink.queue_full >= 7  # one in flight, two queued, the rest dropped
    receiver.release.set()
    sink.close()
    assert sink.sent == 10 - sink.queue_full == len(receiver.requests)


def test_a_webhook_that_never_answers_leaves_every_event_accounted_for(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")
    receiver.release.clear()  # accepts the connection, never answers
    sink = WebhookSink(receiver.url, min_interval_s=0, timeout_s=30, close_timeout_s=0.3)
    for step in range(1, 4):
        sink.on_event(Event(step, "rollback", "weights were NaN"))
    sink.close()
    # one in flight, two queued: none sent, none failed, none dropped, all pending
    assert (sink.sent, sink.failed, sink.queue_full, sink.rate_limited) == (0, 0, 0, 0)
    assert sink.pending == 3
    warned = [r for r in caplog.records if "pending" in r.getMessage()]
    assert len(warned) == 1 and warned[0].args[1] == 3  # type: ignore[index]
    receiver.release.set()


def test_telegram_posts_send_message_with_chat_id_and_text(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STABLEOPT_TELEGRAM_TOKEN", "123:ABC")
    monkeypatch.setenv("STABLEOPT_TELEGRAM_CHAT_ID", "-42")
    sink = TelegramSink(api_base=receiver.url, min_interval_s=0)
    assert "123:ABC" not in repr(sink)
    # two corrupting updates: rollback and lr_cut repeat, and the repeats are rate-limited
    opt = train(80, {**FAULTS, 60: "nan_weights"}, sinks=[sink], check_weights="every_step")
    notifying = [e for e in opt.events() if e.kind in DEFAULT_NOTIFY_KINDS]
    assert {path for path, _ in receiver.requests} == {"/bot123:ABC/sendMessage"}
    assert sorted(body["text"] for _, body in receiver.requests) == sorted(
        f"stableopt: step {e.step}: {e.kind}: {e.reason}" for e in notifying
    )
    assert {body["chat_id"] for _, body in receiver.requests} == {"-42"}


def test_telegram_needs_a_token_and_a_chat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STABLEOPT_TELEGRAM_TOKEN", raising=False)
    monkeypatch.delenv("STABLEOPT_TELEGRAM_CHAT_ID", raising=False)
    with pytest.raises(ValueError, match="STABLEOPT_TELEGRAM_TOKEN"):
        TelegramSink(chat_id=1)
    with pytest.raises(ValueError, match="STABLEOPT_TELEGRAM_CHAT_ID"):
        TelegramSink(token="t")
    with pytest.raises(ValueError, match="url"):
        WebhookSink("ftp://example.org/hook")


def test_unreachable_endpoints_never_reach_training(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")
    url = closed_port_url()
    webhook = WebhookSink(f"{url}/secret-path", min_interval_s=0, timeout_s=2)
    telegram = TelegramSink("SECRET-TOKEN", 7, api_base=url, min_interval_s=0, timeout_s=2)
    opt = train(80, FAULTS, sinks=[webhook, telegram])  # close() drains both
    notifying = [e for e in opt.events() if e.kind in DEFAULT_NOTIFY_KINDS]
    assert opt.stats()["steps"] == 80
    assert webhook.failed == telegram.failed == len(notifying) > 0
    assert webhook.sent == telegram.sent == 0
    assert "could not send" in caplog.text and "training goes on" in caplog.text
    assert "SECRET-TOKEN" not in caplog.text and "secret-path" not in caplog.text
