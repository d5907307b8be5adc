"""The report: a real faulty run logged by JsonlSink, drawn to a PNG, read back as an image."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stableopt import SafeOptimizer
from stableopt.report import draw_report, main, read_run_log
from stableopt.sinks import JsonlSink
from tests.test_recommend import one_thread, train  # noqa: F401  (one_thread: autouse fixture)

pytest.importorskip("matplotlib")

FAULTS: dict[int, Any] = {
    40: "nan_grad",
    70: "grad_spike",
    100: "poison_batch",
    101: "poison_batch",
    130: "nan_weights",
}


class LossInStats:
    """Adds the step's loss to the logged metrics, as a user's own sink would."""

    def __init__(self, sink: JsonlSink) -> None:
        self.sink = sink
        self.loss: float | None = None

    def observe(self, loss: float) -> None:
        self.loss = loss

    def on_event(self, event: Any) -> None:
        self.sink.on_event(event)

    def on_metrics(self, step: int, metrics: Any) -> None:
        self.sink.on_metrics(step, {**metrics, "loss": self.loss})

    def close(self) -> None:
        self.sink.close()


@pytest.fixture(scope="module")
def run_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SafeOptimizer]:
    path = tmp_path_factory.mktemp("report") / "run.jsonl"
    threads = torch.get_num_threads()  # module scope: set up before the autouse one_thread
    torch.set_num_threads(1)
    try:
        opt = train(160, FAULTS, sinks=[JsonlSink(path)], every_steps=5)
    finally:
        torch.set_num_threads(threads)
    return path, opt


def assert_real_picture(png: Path) -> np.ndarray:
    import matplotlib.image

    assert png.stat().st_size > 30_000
    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert height > 800 and width > 800
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not a blank canvas
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.02  # a good share of inked pixels
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    assert colourful.mean() > 0.002  # the coloured lines and markers are there
    return image


def test_report_of_a_faulty_run_is_a_real_picture(
    run_log: tuple[Path, SafeOptimizer], tmp_path: Path
) -> None:
    path, _ = run_log
    png = draw_report(path, tmp_path / "out" / "run.png")
    assert png == tmp_path / "out" / "run.png"
    assert_real_picture(png)


def test_report_draws_the_loss_when_the_metrics_carry_it(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    sink = LossInStats(JsonlSink(path))
    opt = train(80, {40: "nan_grad"}, sinks=[sink], every_steps=5, on_loss=sink.observe)
    assert opt.stats()["skipped_steps"] == 1
    logged = read_run_log(path)
    assert len(logged.series("loss")[0]) == len(logged.metrics) == 16
    with_loss = assert_real_picture(draw_report(path, tmp_path / "with_loss.png"))
    without = read_run_log(path)  # the same log minus the loss draws a shorter loss panel
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    stripped = tmp_path / "no_loss.jsonl"
    stripped.write_text("".join(json.dumps({**r, "loss": None}) + "\n" for r in lines))
    no_loss = assert_real_picture(draw_report(stripped, tmp_path / "no_loss.png"))
    assert with_loss.shape[0] > no_loss.shape[0]
    assert len(without.events) == len(opt.events())


def test_read_run_log_restores_events_and_numbers(
    run_log: tuple[Path, SafeOptimizer], tmp_path: Path
) -> None:
    path, opt = run_log
    logged = read_run_log(path)
    assert [(e.step, e.kind, e.cause, e.data, e.labels) for e in logged.events] == [
        (e.step, e.kind, e.cause, e.data, e.labels) for e in opt.events()
    ] or all(  # a NaN in the data reads back as NaN, which is not == itself
        (a.step, a.kind, a.cause, a.labels) == (b.step, b.kind, b.cause, b.labels)
        for a, b in zip(logged.events, opt.events(), strict=True)
    )
    nan_skip = next(e for e in logged.events if e.step == 40 and e.kind == "skip")
    assert math.isnan(nan_skip.data["grad_norm"])
    steps, health = logged.series("system_health")
    assert steps == list(range(5, 161, 5)) and health[-1] == opt.stats()["system_health"]
    # A log still being written may end in half a line: it is skipped, not fatal.
    truncated = tmp_path / "live.jsonl"
    truncated.write_text(path.read_text() + '{"type": "metrics", "st')
    assert read_run_log(truncated).skipped_lines == 1


def test_main_writes_the_png_and_reports_errors(
    run_log: tuple[Path, SafeOptimizer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = run_log
    out = tmp_path / "cli.png"
    assert main([str(path), "-o", str(out), "--title", "faulty run"]) == 0
    assert out.stat().st_size > 30_000 and str(out) in capsys.readouterr().out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([str(empty)]) == 1
    assert "holds no metrics" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl")]) == 1


def test_missing_matplotlib_names_the_extra(
    run_log: tuple[Path, SafeOptimizer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"stableopt\[plot\]"):
        draw_report(run_log[0], tmp_path / "x.png")


def test_a_skip_is_drawn_by_its_reason_not_by_its_words(tmp_path: Path) -> None:
    """A finite skip by ``skip_above`` is its own marker, not a NaN/Inf skip (its sentence
    says "gradient norm 1521 is above skip_above=5.0": no "spike" in it)."""
    from stableopt import EmergencyClip
    from stableopt.outcomes import SkipReason
    from stableopt.report import _categories

    path = tmp_path / "run.jsonl"
    opt = train(
        60,
        {40: "grad_spike"},
        sinks=[JsonlSink(path)],
        every_steps=5,
        emergency_clip=EmergencyClip(skip_above=5.0),
        spike=None,
    )
    skip = next(e for e in read_run_log(path).events if e.kind == "skip")
    assert skip.cause is SkipReason.ABOVE_SKIP_LIMIT
    assert opt.last_step is not None
    categories = _categories(read_run_log(path).events)
    assert categories.get("limit_skip") == [skip.step] == [40]
    assert "nonfinite_skip" not in categories
    assert_real_picture(draw_report(path, tmp_path / "run.png"))


def test_a_log_without_causes_draws_its_skips_as_plain_skips(tmp_path: Path) -> None:
    """A run log written before events carried a cause: no guess from the words."""
    from stableopt.report import _categories

    path = tmp_path / "old.jsonl"
    path.write_text(
        json.dumps({"type": "event", "step": 3, "kind": "skip", "reason": "loss spike (9, ...)"})
        + "\n"
    )
    assert _categories(read_run_log(path).events) == {"skip": [3]}
