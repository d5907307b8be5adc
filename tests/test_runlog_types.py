"""The run log holds numbers as JSON numbers (``null`` for no finite value, never a string), names
the clipped steps, and the report draws a threshold that is null on some steps without joining
the points around the gap."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from stableopt import Monitor, SafeLoss, SafeOptimizer
from stableopt.report import RunLog, draw_report, read_run_log, threshold_line
from stableopt.sinks import JsonlSink
from stableopt.testing.faults import FaultSchedule, RegressionTask, run_training

NUMERIC = (*Monitor.COUNTERS, "system_health", "grad_norm", "clip_threshold", "lr_factor", "loss")


def logged_run(path: Path, clip: Any, steps: int = 120) -> tuple[SafeOptimizer, list[int]]:
    """A real run with NaN gradients, an Inf loss and a spike, logged every 5 steps; and the
    clipped steps as the optimizer's own verdicts say (the independent record)."""
    task = RegressionTask(seed=0)
    model = task.make_model()
    monitor = Monitor(sinks=[JsonlSink(path)], every_steps=5)
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), clip=clip, monitor=monitor)
    clipped: list[int] = []

    def record(optimizer: Any, args: Any, kwargs: Any) -> None:
        verdict = optimizer.last_verdict
        if verdict.is_accepted and verdict.is_clipped:
            clipped.append(verdict.step)

    opt.register_step_post_hook(record)
    schedule = FaultSchedule({30: "nan_grad", 55: "inf_loss", 80: "grad_spike"})
    loss_fn = SafeLoss(torch.nn.functional.mse_loss, optimizer=opt)  # the metrics get a loss
    result = run_training(model, opt, task, steps, schedule, loss_fn=loss_fn)
    assert result.error is None
    monitor.close()
    return opt, clipped


def strict_records(path: Path) -> list[dict[str, Any]]:
    def reject(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.parametrize("clip", ["zscore", 0.5, None], ids=["zscore", "fixed", "off"])
def test_numbers_are_numbers_or_null_never_strings(tmp_path: Path, clip: Any) -> None:
    path = tmp_path / "run.jsonl"
    opt, clipped = logged_run(path, clip)
    records = strict_records(path)
    metrics = [r for r in records if r["type"] == "metrics"]
    assert len(metrics) == 24
    for record in metrics:
        for key in NUMERIC:
            value = record.get(key)
            assert value is None or is_number(value), (record["step"], key, value)
        assert isinstance(record["emergency_mode"], bool)
    by_step = {r["step"]: r for r in metrics}
    # the NaN-gradient step is a metrics step: no finite norm, so null (was the string "nan")
    assert by_step[30]["grad_norm"] is None and by_step[30]["skipped_steps"] == 1
    assert by_step[55]["loss"] is None  # the Inf loss
    assert all(is_number(r["loss"]) for r in metrics if r["step"] != 55)
    for event in (r for r in records if r["type"] == "event"):
        assert all(v is None or is_number(v) for v in event["data"].values()), event
    nan_skip = next(r for r in records if r["type"] == "event" and r["step"] == 30)
    assert nan_skip["data"]["grad_norm"] is None and nan_skip["cause"] == "nonfinite_grads"

    thresholds = [r["clip_threshold"] for r in metrics]
    if clip is None:
        assert thresholds == [None] * len(metrics)  # clipping off
    elif clip == 0.5:
        # a fixed max norm is in force on every step; at the spike, the emergency clip's half
        assert by_step[80]["clip_threshold"] == 0.25
        assert all(t == 0.5 for r, t in zip(metrics, thresholds) if r["step"] != 80)
    else:
        # the norm above which the next step is clipped (ZClip's level, the spike guard's
        # bound, the emergency threshold): null (inf) only before any of them is known
        known = [i for i, t in enumerate(thresholds) if t is not None]
        assert known and all(is_number(t) and t > 0 for t in thresholds[known[0] :])

    # clipped_steps: every clipped step once, in the line of its metrics interval
    logged = [s for r in metrics for s in r["clipped_steps"]]
    assert logged == clipped
    assert len(clipped) == opt.stats()["total_clips"]
    previous = 0
    for record in metrics:
        assert all(previous < s <= record["step"] for s in record["clipped_steps"])
        previous = record["step"]
    if clip == 0.5:
        assert len(clipped) > 10


def write_log(path: Path, thresholds: list[Any], **extra: Any) -> None:
    lines = [{"type": "start", "time": 0.0, "version": "0.1.0"}]
    for i, threshold in enumerate(thresholds, start=1):
        lines.append(
            {
                "type": "metrics",
                "step": 10 * i,
                "grad_norm": 1.0 + 0.1 * i,
                "clip_threshold": threshold,
                "system_health": 1.0,
                "lr_factor": 1.0,
                "total_clips": i,
                **extra,
            }
        )
    lines.append(
        {"type": "event", "step": 25, "kind": "skip", "reason": "x", "data": {"grad_norm": None}}
    )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_threshold_line_breaks_where_it_is_null(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_log(path, [1.0, 1.5, None, 2.0, None, None, 3.0, 3.5])
    xs, ys = threshold_line(read_run_log(path))
    # stretches [10, 20], [40] and [70, 80]; each break sits on its stretch's last step, so no
    # segment spans a null (nothing joins 20 to 40, or 40 to 70)
    assert xs == [10, 20, 20, 40, 40, 70, 80]
    assert [None if math.isnan(y) else y for y in ys] == [1.0, 1.5, None, 2.0, None, 3.0, 3.5]


def test_the_report_draws_null_and_old_string_thresholds(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    mixed, old, none = tmp_path / "mixed.jsonl", tmp_path / "old.jsonl", tmp_path / "none.jsonl"
    write_log(mixed, [None, 0.8, None, None, 1.2, 1.3, None], clipped_steps=[])
    write_log(old, ["inf", 0.8, "inf", "inf", 1.2, 1.3, "inf"])  # a 0.1.0 log
    write_log(none, [None] * 7)
    assert threshold_line(read_run_log(mixed)) == threshold_line(read_run_log(old))
    assert threshold_line(read_run_log(none)) == ([], [])
    for path in (mixed, old, none):
        png = draw_report(path, path.with_suffix(".png"))
        assert png.stat().st_size > 20_000
    run = read_run_log(mixed)
    assert math.isnan(run.events[0].data["grad_norm"])  # null in an event's data: not finite
    assert run.series("clip_threshold") == ([20, 50, 60], [0.8, 1.2, 1.3])


def test_clipped_steps_come_from_the_log_or_from_the_clip_counter() -> None:
    exact = RunLog(
        metrics=[
            {"step": 5, "total_clips": 2, "clipped_steps": [2, 4]},
            {"step": 10, "total_clips": 2, "clipped_steps": []},
            {"step": 15, "total_clips": 3, "clipped_steps": [13]},
        ]
    )
    assert exact.clipped_steps() == [2, 4, 13]
    # a log without clipped_steps: the metrics steps at which total_clips grew
    counted = RunLog(
        metrics=[{"step": s, "total_clips": c} for s, c in ((5, 0), (10, 2), (15, 2), (20, 3))]
    )
    assert counted.clipped_steps() == [10, 20]
