"""Smoke test of the LR-sensitivity sweep: the formula by hand, and a tiny real run.

The sensitivity is checked against a hand computation on made-up tables; the sweep
itself runs 3 LRs x 20 steps on the MLP. SPAM/StableSPAM join only where
``pytorch-optimizer`` is installed. No timing is asserted.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from benchmarks.lr_sweep import (
    LRS,
    MLP_LRS,
    SweepConfig,
    SweepRecord,
    SweepResult,
    curves,
    run_sweep,
    sensitivity,
)
from benchmarks.lr_sweep_report import format_markdown, target_verdicts, write_results

HAS_SPAM = importlib.util.find_spec("pytorch_optimizer") is not None
METHODS = ("adamw", "safe", *(("spam",) if HAS_SPAM else ()))


def test_the_grids_span_the_hot_side() -> None:
    for grid, best in ((LRS, 1e-2), (MLP_LRS, 3e-2)):
        hot = [lr for lr in grid if lr >= best]
        assert len(hot) >= 7 and max(grid) / best >= 10**2.5
        assert len([lr for lr in grid if lr < best]) >= 2


def test_sensitivity_by_hand() -> None:
    losses = {1e-3: 3.0, 1e-2: 2.0, 1e-1: 2.5, 1.0: 4.0}
    hot, full = sensitivity(losses, hot_from=1e-2)
    assert hot == pytest.approx((0.0 + 0.5 + 2.0) / 3)
    assert full == pytest.approx((1.0 + 0.0 + 0.5 + 2.0) / 4)
    # The hot side defaults to the curve's own best LR.
    assert sensitivity(losses) == (hot, full)
    assert sensitivity(losses, hot_from=1e-1)[0] == pytest.approx((0.5 + 2.0) / 2)


def _r(method: str, lr: float, seed: int, final: float, diverged: bool = False) -> SweepRecord:
    return SweepRecord("t", "cosine", method, lr, seed, 4.0, final, diverged)


def test_curves_count_divergence_as_the_initial_loss() -> None:
    records = [
        _r("adamw", 0.01, 0, 2.0), _r("adamw", 0.01, 1, 2.2),
        _r("adamw", 0.1, 0, 3.0), _r("adamw", 0.1, 1, float("nan"), diverged=True),
        _r("adamw", 1.0, 0, 5.0), _r("adamw", 1.0, 1, 4.5),  # worse than initial: min()
        _r("safe", 0.01, 0, 2.1), _r("safe", 0.01, 1, 2.1),
        _r("safe", 0.1, 0, 1.9), _r("safe", 0.1, 1, 1.9),
        _r("safe", 1.0, 0, 2.5), _r("safe", 1.0, 1, 2.5),
    ]  # fmt: skip
    plain, safe = curves(records)
    assert plain.losses == {0.01: pytest.approx(2.1), 0.1: 3.5, 1.0: 4.0}
    assert plain.diverged == {0.01: 0, 0.1: 1, 1.0: 0}
    assert plain.best_lr == 0.01 and safe.best_lr == 0.1
    # Both hot sides start at plain AdamW's best LR; each subtracts its own best.
    assert plain.hot_from == safe.hot_from == 0.01
    assert plain.hot == pytest.approx((0.0 + 1.4 + 1.9) / 3)
    assert safe.hot == pytest.approx((0.2 + 0.0 + 0.6) / 3)
    verdicts = {v[2]: v[3] for v in target_verdicts([plain, safe])}
    assert list(verdicts.values()) == [True, True, True]
    at_best = [v for v in target_verdicts([plain, safe]) if "best LR" in v[2]][0]
    assert "(ratio 1.0000)" in at_best[4]


@pytest.fixture(scope="module")
def result() -> SweepResult:
    config = SweepConfig(
        tasks=("mlp",), schedules=("constant",), methods=METHODS, lrs=(1e-2, 1.0, 100.0),
        seeds=1, steps=20, jobs=1,
    )  # fmt: skip
    return run_sweep(config, progress=False)


def test_one_record_per_cell(result: SweepResult) -> None:
    keys = sorted((r.method, r.lr) for r in result.records)
    assert keys == sorted((m, lr) for m in METHODS for lr in (1e-2, 1.0, 100.0))
    for r in result.records:
        assert r.counted <= r.initial
        if r.lr == 1e-2:
            assert not r.diverged and r.final < r.initial
    assert {c.method for c in curves(result.records)} == set(METHODS)


def test_results_files(result: SweepResult, tmp_path: Path) -> None:
    written = write_results(result, tmp_path, "s")
    assert str(tmp_path / "s.md") in written and str(tmp_path / "s.csv") in written
    assert len(list(csv.DictReader((tmp_path / "s.csv").open()))) == len(result.records)
    text = format_markdown(result)
    assert "## Definition" in text and "per-method best" in text
    assert "## Final held-out loss per LR: mlp, constant" in text


def test_cli_lr_sweep_quick(tmp_path: Path) -> None:
    from stableopt.cli import main

    argv = ["bench", "--lr-sweep", "--quick", "--lrs", "0.01,1", "--steps", "10"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "lr_sweep-quick.md").read_text()
    assert "command: `python -m stableopt bench --lr-sweep --quick --lrs 0.01,1" in text


def test_modes_are_mutually_exclusive() -> None:
    from benchmarks.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--harm", "--lr-sweep"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--perf", "--harm"])


def test_the_trace_records_the_lr_each_update_used(tmp_path: Path) -> None:
    from benchmarks.lr_trace import trace, write

    safe = trace("charlm", "constant", "safe", 10.0, steps=40)
    cuts = [(s, r) for s, k, r in safe.events if k == "lr_cut"]
    assert cuts, "an LR 1000x plain AdamW's best is cut"
    first = cuts[0][0]
    # the effective LR of each step: the schedule's times the factor in force, 1 before the cut
    assert safe.effective[:first] == safe.scheduled[:first]
    factor = float(cuts[0][1].rsplit("-> ", 1)[1].split()[0])
    assert safe.effective[first] == pytest.approx(safe.scheduled[first] * factor)
    plain = trace("charlm", "constant", "adamw", 10.0, steps=40)
    assert plain.effective == plain.scheduled and not plain.events
    written = write([plain, safe], "charlm", "constant", 10.0, tmp_path, 1.0)
    text = (tmp_path / "lr_trace.md").read_text()
    assert str(tmp_path / "lr_trace.md") in written and f"| {first} | lr_cut |" in text
