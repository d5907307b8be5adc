"""Smoke test of the do-no-harm benchmark: a tiny run through the real code path.

Three configurations x 1 seed x 20 steps; the summary's numbers are recomputed here
from the records, and the verdict rules are checked on a made-up table. No timing is
asserted.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from benchmarks.harm import (
    CASES,
    HarmConfig,
    HarmRecord,
    HarmResult,
    count_lr_changes,
    run_harm,
    summarize,
)
from benchmarks.harm_report import format_markdown, write_results
from benchmarks.tasks import CharLMTask, Images, Regression
from benchmarks.tasks_text import VOCAB, corpus, corpus_files, encode
from stableopt import Event

NAMES = ("mlp-adamw", "mlp-sum-b256", "charlm-adamw")


@pytest.fixture(scope="module")
def result() -> HarmResult:
    return run_harm(HarmConfig(cases=NAMES, seeds=1, steps=20, jobs=1), progress=False)


def test_the_suite_spans_what_it_promises() -> None:
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)
    assert {c.reduction for c in CASES} == {"mean", "sum"}
    assert {c.schedule for c in CASES} == {"constant", "cosine", "none"}
    assert {c.model for c in CASES} == {"mlp", "cnn-bn", "lstm", "transformer"}
    scales = {c.task_options.get("output_scale", 1.0) for c in CASES}
    assert min(scales) == 1e-4 and max(scales) == 1e4
    batches = {c.make_task(0).batch(1)[0].shape[0] for c in CASES}
    assert min(batches) == 1 and max(batches) == 256


def test_one_pair_of_runs_per_configuration(result: HarmResult) -> None:
    keys = sorted((r.case, r.seed, r.method) for r in result.records)
    assert keys == sorted((n, 0, m) for n in NAMES for m in ("plain", "safe"))
    for r in result.records:
        assert r.steps == 20 and math.isfinite(r.initial) and math.isfinite(r.final)
        assert not r.died and r.final < r.initial  # healthy runs learn
        if r.method == "plain":
            assert r.skipped == r.rollbacks == r.lr_cuts == r.clips == 0
    # Same weights, same data: plain and safe start from the same held-out loss.
    by = {(r.case, r.method): r for r in result.records}
    for name in NAMES:
        assert by[(name, "safe")].initial == by[(name, "plain")].initial


def test_summary_numbers_match_the_records(result: HarmResult) -> None:
    by = {(r.case, r.method): r for r in result.records}
    for s in summarize(result.records):
        safe, plain = by[(s.case.name, "safe")], by[(s.case.name, "plain")]
        assert s.ratios == [pytest.approx(safe.final / plain.final)]
        assert s.skipped_share == safe.skipped / 20
        assert s.clipped_share == safe.clips / 20
        assert s.met == (not s.misses)


def _record(case: str, method: str, final: float, **kw: object) -> HarmRecord:
    return HarmRecord(case, 0, method, 1000, 1.0, final, not math.isfinite(final), **kw)  # type: ignore[arg-type]


def test_verdicts_on_a_made_up_table() -> None:
    records = [
        _record("mlp-adamw", "plain", 0.10),
        _record("mlp-adamw", "safe", 0.1005, skipped=5, clips=100),  # 0.5% skipped: met
        _record("mlp-x1e4", "plain", 0.20),
        _record("mlp-x1e4", "safe", 0.25, skipped=6, rollbacks=1, lr_cuts=2),
        _record("mlp-sum-b256", "plain", 0.3),
        _record("mlp-sum-b256", "safe", 0.3, error="DivergenceError at step 9: x"),
    ]
    records[-1].died = True
    met, hot, dead = summarize(records)
    assert met.met and met.ratios == [pytest.approx(1.005)] and met.clipped_share == 0.1
    assert hot.misses == [
        "1 rollback(s)",
        "2 LR cut(s)",
        "skipped 0.6% of steps (worst seed; target <= 0.5%)",
        "median loss ratio 1.250 (target <= 1.01)",
    ]
    assert dead.ratios == [math.inf] and dead.divergence_errors == 1
    assert dead.misses[0] == "died in 1/1 seeds (1 DivergenceError)"


def test_lr_changes_are_cuts_or_recoveries_by_their_factors() -> None:
    events = [
        Event(3, "lr_cut", "", {"old_factor": 1.0, "new_factor": 0.5}),
        Event(9, "lr_recovery", "", {"old_factor": 0.5, "new_factor": 1.0}),
        Event(12, "plateau", "", {"old_factor": 1.0, "new_factor": 0.5}),
        Event(13, "skip", "not an LR change"),
    ]
    assert count_lr_changes(events) == (2, 1)


def test_the_text_corpus() -> None:
    files = corpus_files()
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    train, held = corpus()
    assert len(train) + len(held) == 400_000 and len(held) == 40_000
    assert int(train.min()) >= 0 and int(train.max()) < VOCAB
    assert encode("a\n\t\u00e9").tolist() == [ord("a") - 32, 95, 96, 97]


def test_batches_are_a_function_of_seed_and_step() -> None:
    for make in (Regression, Images, CharLMTask):
        a, b = make(seed=1).batch(5), make(seed=1).batch(5)
        assert all(bool((x == y).all()) for x, y in zip(a, b))
        assert not bool((make(seed=1).batch(6)[0] == a[0]).all())


def test_results_files(result: HarmResult, tmp_path: Path) -> None:
    written = write_results(result, tmp_path, "h")
    assert str(tmp_path / "h.md") in written and str(tmp_path / "h.csv") in written
    rows = list(csv.DictReader((tmp_path / "h.csv").open()))
    assert len(rows) == len(result.records)
    text = format_markdown(result)
    assert "## Verdict" in text and "| mlp-adamw |" in text and "**mlp-sum-b256**" in text


def test_cli_harm_quick(tmp_path: Path) -> None:
    from stableopt.cli import main

    argv = ["bench", "--harm", "--quick", "--configs", "mlp-adamw", "--steps", "10"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "harm-quick.md").read_text()
    assert "command: `python -m stableopt bench --harm --quick --configs mlp-adamw" in text
    assert len(list(csv.DictReader((tmp_path / "harm-quick.csv").open()))) == 2
