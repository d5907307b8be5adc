"""Smoke test of the stability benchmark: a --quick-sized run end to end.

2 scenarios x 3 methods x 1 seed on both model families, a few training steps.
Checks the shape of the results and that SafeOptimizer survives NaN gradients
where plain AdamW does not. No timing is asserted.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from benchmarks.stability import StabilityConfig, StabilityResult, run_stability
from benchmarks.stability_report import format_markdown, write_results
from benchmarks.stability_summary import summarize

SCENARIOS = ("clean", "nan_grad")
METHODS = ("adamw", "adamw+clip", "safe")
CONFIG = StabilityConfig(
    scenarios=SCENARIOS, methods=METHODS, seeds=1, steps={"mlp": 40, "lm": 20}, jobs=1
)


@pytest.fixture(scope="module")
def result() -> StabilityResult:
    return run_stability(CONFIG, progress=False)


def test_one_record_per_cell(result: StabilityResult) -> None:
    keys = [(r.family, r.scenario, r.method, r.seed) for r in result.records]
    expected = [(f, s, m, 0) for f in ("mlp", "lm") for s in SCENARIOS for m in METHODS]
    assert sorted(keys) == sorted(expected)
    assert len(summarize(result.records)) == len(expected)


def test_safe_optimizer_survives_nan_gradients(result: StabilityResult) -> None:
    for record in result.records:
        if record.scenario == "nan_grad" and record.method == "safe":
            assert not record.diverged and math.isfinite(record.held_out)
            assert record.skipped >= 1
        if record.scenario == "nan_grad" and record.method == "adamw":
            assert record.diverged  # the fault is real
        if record.scenario == "clean":
            assert record.ratio == pytest.approx(1.0, rel=1e-3)


def test_cli_quick_run_writes_its_results(tmp_path: Path) -> None:
    from stableopt.cli import main

    code = main(
        ["bench", "--quick", "--families", "mlp", "--steps", "20", "--no-progress",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "stability-quick.csv").open()))
    assert {(r["scenario"], r["method"]) for r in rows} == {
        (s, m) for s in ("clean", "nan_grad") for m in ("adamw", "adamw+clip", "safe")
    }
    assert "Stability benchmark" in (tmp_path / "stability-quick.md").read_text()


def test_results_files(result: StabilityResult, tmp_path: Path) -> None:
    written = write_results(result, str(tmp_path), "s")
    assert str(tmp_path / "s.md") in written and str(tmp_path / "s.csv") in written
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == len(result.records)
    markdown = format_markdown(result)
    assert "| mlp | nan_grad |" in markdown and "Target" in markdown
