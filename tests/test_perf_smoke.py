"""Smoke test of the overhead benchmark: it runs and its tables have the expected shape.

No timing is asserted (DESIGN.md: overhead is measured as ratios in one benchmark run,
never in timed unit tests); the memory accounting is checked against its definition.
"""

from __future__ import annotations

import csv
import math
from dataclasses import fields
from pathlib import Path

import pytest

from benchmarks.perf import METHODS, PerfConfig, PerfRow, parse_size, run_perf
from benchmarks.perf_report import format_markdown, write_results
from stableopt.cli import main

IMPLS = ("foreach", "fused")
TINY = PerfConfig(sizes=(20_000,), optimizers=("adamw",), impls=IMPLS, rounds=3, warmup=2)


@pytest.fixture(scope="module")
def rows() -> list[PerfRow]:
    return run_perf(TINY, progress=False).rows


def test_one_row_per_method_and_configuration(rows: list[PerfRow]) -> None:
    assert [(r.impl, r.method) for r in rows] == [(i, m.name) for i in IMPLS for m in METHODS]
    for row in rows:
        assert row.size == "20k" and row.optimizer == "adamw" and row.rounds == 3
        assert row.n_tensors == 48 and abs(row.n_params - 20_000) < 2_000
        assert row.median_ms > 0 and row.p25_ms <= row.median_ms <= row.p75_ms
        assert math.isfinite(row.ratio) and row.ratio > 0
        assert row.interventions == 0  # every measured step was a normal one
    assert all(r.ratio == 1.0 for r in rows if r.method == "clip")


def test_targets_apply_to_the_defaults_and_the_clip_policies(rows: list[PerfRow]) -> None:
    for row in rows:
        has_target = row.method == "defaults" or row.group == "policy"
        assert (row.time_target is not None) == has_target
        if has_target:
            assert row.time_target == (1.0 if row.impl == "fused" else 1.05)
            assert row.time_met == (row.ratio <= row.time_target)
        assert (row.memory_limit is not None) == (row.group not in ("baseline",))


def test_memory_accounting(rows: list[PerfRow]) -> None:
    params_bytes = 4 * rows[0].n_params
    for row in rows:
        assert row.transient_bytes is not None and row.transient_bytes >= 0
        # AdamW state: exp_avg and exp_avg_sq (plus a scalar step) per parameter.
        assert row.state_bytes >= 2 * params_bytes
        has_snapshot = row.method == "rollback" or row.method.startswith("defaults")
        # The snapshot is the documented one copy of parameters and state, plus (with the
        # judging stages on) their histories at the snapshot: a few KiB of host numbers.
        copy_bytes = (params_bytes + row.state_bytes) if has_snapshot else 0
        histories = 4096 if row.method.startswith("defaults") else 0
        assert copy_bytes <= row.snapshot_bytes <= copy_bytes + histories
        assert row.peak_bytes == (
            2 * params_bytes
            + row.state_bytes
            + row.snapshot_bytes
            + row.history_bytes
            + row.transient_bytes
        )
        assert (row.snapshot_ms is not None) == has_snapshot


def test_markdown_and_csv(rows: list[PerfRow], tmp_path: Path) -> None:
    result = run_perf(
        PerfConfig(sizes=(5_000,), optimizers=("sgd",), impls=("forloop",), rounds=1, warmup=2),
        progress=False,
    )
    result.rows = rows  # the fixture's rows: two configurations
    markdown_path, csv_path = write_results(result, tmp_path, "perf-test")
    with csv_path.open(encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [f.name for f in fields(PerfRow)]
    assert [(r["impl"], r["method"]) for r in table] == [(r.impl, r.method) for r in rows]
    text = markdown_path.read_text(encoding="utf-8")
    assert text == format_markdown(result)
    for heading in (
        "## Targets",
        "## Per step: SafeOptimizer(X) defaults vs X + clip_grad_norm_",
        "## The weight check: the defaults with each `check_weights` mode",
        "## Each stage alone",
        "## Clip policies alone",
        "## Peak memory",
    ):
        assert heading in text
    for impl in IMPLS:  # one row per configuration in each of the five tables
        assert text.count(f"| 20k | adamw | {impl} |") == 5
    assert "Blocking device syncs" not in text  # CUDA only


def test_cli_bench_perf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--perf", "--quick", "--sizes", "5k", "--optimizers", "sgd"]
    argv += ["--impls", "fused", "--rounds", "1", "--warmup", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    text = (tmp_path / "perf-cpu-quick.md").read_text(encoding="utf-8")
    assert "Command: `python -m stableopt bench --perf --quick --sizes 5k" in text
    assert (tmp_path / "perf-cpu-quick.csv").exists()
    assert "| 5k | sgd | fused |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "value"), [("50M", 50_000_000), ("200k", 200_000), ("1.5M", 1_500_000), ("5000", 5000)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
