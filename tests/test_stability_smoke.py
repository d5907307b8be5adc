"""Smoke test of the stability benchmark: a --quick-sized run end to end, and the new scenarios.

2 scenarios x 3 methods x 1 seed on both model families, a few training steps.
Checks the shape of the results and that SafeOptimizer survives NaN gradients
where plain AdamW does not; then the recurring faults, the loss-scale stage and the
peers (ARC, StabilityGuard: left out where their package is not installed) on the
MLP for 30 steps. No timing is asserted.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from benchmarks.stability import SCENARIOS as SCENARIOS_
from benchmarks.stability import StabilityConfig, StabilityResult, _Injector, run_stability
from benchmarks.stability_report import format_markdown, write_results
from benchmarks.stability_summary import summarize

SCENARIOS = ("clean", "nan_grad")
METHODS = ("adamw", "adamw+clip", "safe")
CONFIG = StabilityConfig(
    scenarios=SCENARIOS,
    methods=METHODS,
    seeds=1,
    steps={"mlp": 40, "lm": 20, "cnn": 20},
    jobs=1,
)


@pytest.fixture(scope="module")
def result() -> StabilityResult:
    return run_stability(CONFIG, progress=False)


def test_one_record_per_cell(result: StabilityResult) -> None:
    keys = [(r.family, r.scenario, r.method, r.seed) for r in result.records]
    expected = [
        (f, s, m, 0)
        for f in ("mlp", "lm", "cnn")
        for s in SCENARIOS
        if f in SCENARIOS_[s].families
        for m in METHODS
    ]
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


# -- the recurring faults, the loss-scale stage and the peers ------------------------

PEERS = tuple(
    m for m, module in (("arc", "arc"), ("stabilityguard", "stabilityguard"))
    if importlib.util.find_spec(module) is not None
)  # fmt: skip


def test_recurring_faults_and_the_loss_scale_stage() -> None:
    every7 = SCENARIOS_["nan_grad_every7"].schedule(50, seed=3)
    assert every7.steps_of("nan_grad") == [7, 14, 21, 28, 35, 42, 49]
    every6 = SCENARIOS_["grad_x1e4_every6"].schedule(30, seed=0)
    assert every6.steps_of("grad_spike") == [6, 12, 18, 24, 30]
    assert every6.spike_factor == 1e4
    stage = SCENARIOS_["loss_x1e4_from40"]
    assert [stage.loss_weight(s, 100) for s in (1, 40, 41, 100)] == [1.0, 1.0, 1e4, 1e4]


def test_a_fixed_spike_factor_is_applied_as_is() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    injector = _Injector(SCENARIOS_["grad_x1e4_every6"].schedule(12, 0), optimizer)
    injector.fixed_spikes = True
    with injector:
        injector.begin_step(6)
        param.grad = torch.full((3,), 2.0)
        injector.corrupt_grads([param])
    assert param.grad.tolist() == [2e4, 2e4, 2e4]


@pytest.fixture(scope="module")
def peer_result() -> StabilityResult:
    config = StabilityConfig(
        scenarios=("grad_x1e4_every6", "loss_x1e4_from40"),
        methods=("adamw", *PEERS, "safe"),
        families=("mlp",),
        seeds=1,
        steps={"mlp": 30},
        jobs=1,
    )
    return run_stability(config, progress=False)


def test_new_scenarios_and_peers_run(peer_result: StabilityResult) -> None:
    keys = {(r.scenario, r.method) for r in peer_result.records}
    assert keys == {
        (s, m) for s in ("grad_x1e4_every6", "loss_x1e4_from40") for m in ("adamw", *PEERS, "safe")
    }
    for r in peer_result.records:
        assert math.isfinite(r.reference) and r.reference > 0  # clean plain AdamW, unscaled
        if r.method == "stabilityguard" and r.scenario == "grad_x1e4_every6":
            assert r.skipped >= 1  # a x1e4 gradient is far above its 10x spike threshold
    markdown = format_markdown(peer_result)
    assert "## Where another method does better than SafeOptimizer (defaults)" in markdown
    for peer in ("arc", "stabilityguard"):
        if peer in PEERS:
            assert f"| {peer} |" in markdown.split("## Ablation")[0]  # the comparison table
        else:
            assert f"**{peer} not run**" in markdown


def test_a_nan_batch_poisons_batchnorm_unless_its_buffers_are_put_back() -> None:
    """The hand-written NaN skip keeps the weights but not the running statistics: its model
    in eval mode returns NaN. SafeOptimizer's is finite."""
    from benchmarks.stability import METHODS as ALL_METHODS
    from benchmarks.stability import run_one
    from benchmarks.stability_scenarios import FAMILIES

    family, scenario = FAMILIES["cnn"], SCENARIOS_["nan_batch"]
    assert scenario.schedule(30, 0).steps_of("nan_batch")
    hand = run_one(family, scenario, ALL_METHODS["adamw+clip+skip"], 0, steps=30)
    safe = run_one(family, scenario, ALL_METHODS["safe"], 0, steps=30)
    assert hand.skipped == 1 and not math.isfinite(hand.held_out)
    assert safe.skipped == 1 and math.isfinite(safe.held_out)
