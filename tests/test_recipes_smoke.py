"""Smoke test of the real-recipes benchmark: tiny runs through the real code path.

Four recipes x four variants x (healthy, nan_batch) x 1 seed x 12 steps through
:func:`run_recipes`; the summary's numbers are recomputed here from the records, and the
verdict rules are checked on a made-up table. Each recipe's own iteration is called on
its own; the HF Trainer recipe runs where transformers can be imported and is skipped
with the reason otherwise. No timing is asserted.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from benchmarks.recipes import (
    FAMILIES,
    RECIPES,
    VARIANTS,
    RecipeConfig,
    RecipeRecord,
    RecipeResult,
    hf_unavailable,
    jobs_of,
    run_one,
    run_recipes,
    variant_applies,
    variant_wrap,
)
from benchmarks.recipes_base import FAULTS, RecipeRun, corrupt_tensor, fault_step
from benchmarks.recipes_report import format_markdown, write_results
from benchmarks.recipes_summary import clip_costs, ratio, summarize
from stableopt import SafeOptimizer

NAMES = ("nanogpt", "tacotron2-mean", "resnet-sgd", "seq2seq")
VARIANTS_RUN = ("recipe", "recipe_noclip", "safe_keepclip", "safe_default")
STEPS = 12


@pytest.fixture(scope="module")
def result() -> RecipeResult:
    config = RecipeConfig(
        recipes=NAMES,
        variants=VARIANTS_RUN,
        faults=("healthy", "nan_batch"),
        seeds=1,
        steps=STEPS,
        jobs=1,
    )
    return run_recipes(config, progress=False)


def test_the_suite_has_every_required_recipe() -> None:
    assert set(FAMILIES) == {"nanogpt", "tacotron2", "resnet", "seq2seq", "hf_trainer"}
    assert FAMILIES["tacotron2"] == ("tacotron2-mean", "tacotron2-sum", "tacotron2-ddc")
    assert FAMILIES["resnet"] == ("resnet-sgd", "resnet-nesterov")
    assert FAULTS == ("healthy", "nan_batch", "x1e3_batch", "lr_10x")
    for spec in RECIPES.values():
        assert spec.reference and spec.scaled and spec.steps >= 64
    # torchvision's reference has no clip: keeping or moving one does not apply.
    resnet = RECIPES["resnet-sgd"]
    assert [v for v in VARIANTS if variant_applies(resnet, v)] == ["recipe", "safe_default"]
    assert all(variant_applies(RECIPES["nanogpt"], v) for v in VARIANTS)


def test_default_jobs_run_recipe_noclip_healthy_only() -> None:
    jobs = jobs_of(RecipeConfig(seeds=1), ("nanogpt", "resnet-sgd"))
    cells = {(name, variant, fault) for name, variant, fault, _, _ in jobs}
    assert ("nanogpt", "recipe_noclip", "healthy") in cells
    assert ("nanogpt", "recipe_noclip", "nan_batch") not in cells
    assert len([c for c in cells if c[0] == "nanogpt"]) == 4 * 4 + 1
    assert len([c for c in cells if c[0] == "resnet-sgd"]) == 2 * 4


def test_one_record_per_cell(result: RecipeResult) -> None:
    keys = sorted((r.recipe, r.variant, r.fault) for r in result.records)
    expected = sorted(
        (n, v, f)
        for n in NAMES
        for v in VARIANTS_RUN
        for f in ("healthy", "nan_batch")
        if variant_applies(RECIPES[n], v)
    )
    assert keys == expected
    by = {(r.recipe, r.variant, r.fault): r for r in result.records}
    for r in result.records:
        assert r.steps == STEPS and math.isfinite(r.initial)
        if not r.variant.startswith("safe_"):
            assert r.skipped == r.rollbacks == r.lr_cuts == r.clips == 0 and not r.first_events
        keeps = r.variant in ("recipe", "safe_keepclip") and RECIPES[r.recipe].clip > 0
        assert (r.own_clips >= 0) == keeps
        # Same seed, same weights: every variant starts from the same held-out loss.
        assert r.initial == by[(r.recipe, "recipe", "healthy")].initial
    for name in NAMES:
        healthy = by[(name, "recipe", "healthy")]
        assert not healthy.died and healthy.final < healthy.initial  # the recipes learn
        # As written, a NaN batch kills every one of these recipes.
        assert by[(name, "recipe", "nan_batch")].died


def test_summary_numbers_match_the_records(result: RecipeResult) -> None:
    by = {(r.recipe, r.variant, r.fault): r for r in result.records}
    for cell in summarize(result.records):
        run = by[(cell.recipe, cell.variant, cell.fault)]
        recipe = by[(cell.recipe, "recipe", "healthy")]
        assert cell.seeds == 1 and cell.deaths == int(run.died)
        assert cell.skipped_share == run.skipped / STEPS
        assert cell.clipped_share == run.clips / STEPS
        assert cell.ratios_to_recipe == [ratio(run, recipe)]
        if cell.fault != "healthy":
            healthy = by[(cell.recipe, cell.variant, "healthy")]
            assert cell.ratios == [ratio(run, healthy)]
        elif cell.variant == "safe_keepclip":
            assert cell.ratios == [pytest.approx(run.final / recipe.final)]
        elif cell.variant == "safe_default" and RECIPES[cell.recipe].clip > 0:
            noclip = by[(cell.recipe, "recipe_noclip", "healthy")]
            assert cell.ratios == [pytest.approx(run.final / noclip.final)]
        assert cell.has_target == cell.variant.startswith("safe_")
        assert cell.met == (not cell.misses)
    costs = clip_costs(result.records)
    assert set(costs) == {"nanogpt", "tacotron2-mean", "seq2seq"}


def _record(variant: str, fault: str, final: float, seed: int = 0, **kw: object) -> RecipeRecord:
    died = not math.isfinite(final) or bool(kw.get("error"))
    return RecipeRecord("nanogpt", variant, fault, seed, 1000, 4.0, final, died, **kw)  # type: ignore[arg-type]


def test_verdicts_on_a_made_up_table() -> None:
    records = [
        _record("recipe", "healthy", 2.00),
        _record("recipe_noclip", "healthy", 2.10),
        _record("safe_keepclip", "healthy", 2.02, skipped=5),  # 1.010x, 0.5%: met
        _record("safe_clip", "healthy", 2.03, rollbacks=1, lr_cuts=2, skipped=6),
        _record("safe_default", "healthy", 2.10),  # 1.000x recipe_noclip: met
        _record("recipe", "nan_batch", math.nan),
        _record("safe_keepclip", "nan_batch", 2.1),  # 2.1 / 2.02 = 1.04: met
        _record("safe_clip", "nan_batch", 2.2, error="DivergenceError at step 9: x"),
        _record("safe_default", "nan_batch", 2.3),  # 1.095: missed
    ]
    cells = {(c.variant, c.fault): c for c in summarize(records)}
    assert cells[("safe_keepclip", "healthy")].met
    assert cells[("safe_default", "healthy")].ratios == [1.0]
    assert cells[("safe_clip", "healthy")].misses == [
        "ratio to recipe above 1.01 in 1/1 seeds (worst 1.015)",
        "1 rollback(s)",
        "2 LR cut(s)",
        "skipped 0.6% of steps (worst seed; target <= 0.5%)",
    ]
    assert cells[("safe_keepclip", "nan_batch")].met
    assert cells[("safe_keepclip", "nan_batch")].ratios_to_recipe == [pytest.approx(1.05)]
    dead = cells[("safe_clip", "nan_batch")]
    assert dead.ratios == [math.inf] and dead.divergence_errors == 1
    assert dead.misses == ["died in 1/1 seeds (1 DivergenceError)"]
    assert cells[("safe_default", "nan_batch")].misses == [
        "ratio to safe_default healthy above 1.05 in 1/1 seeds (worst 1.095)"
    ]
    recipe = cells[("recipe", "nan_batch")]
    assert not recipe.has_target and recipe.met and recipe.ratios == [math.inf]
    assert clip_costs(records) == {"nanogpt": [pytest.approx(1.05)]}


def test_faults_and_their_step() -> None:
    x = torch.ones(2, 3)
    assert math.isnan(float(corrupt_tensor(x, "nan_batch")[0, 0]))
    assert int(torch.isnan(corrupt_tensor(x, "nan_batch")).sum()) == 1 and float(x[0, 0]) == 1
    assert torch.equal(corrupt_tensor(x, "x1e3_batch"), x * 1e3)
    assert fault_step(250) == 100 and fault_step(1) == 1


@pytest.mark.parametrize("name", [n for n in RECIPES if RECIPES[n].needs == ""])
def test_each_iteration_runs_on_its_own(name: str) -> None:
    spec = RECIPES[name]
    run: RecipeRun = spec.build(
        0, wrap=variant_wrap(spec, "safe_default"), keep_clip=False, steps=20, lr=spec.lr
    )
    assert isinstance(run.optimizer, SafeOptimizer) and run.safe is run.optimizer
    assert run.optimizer.optimizer is run.inner and run.lr == spec.lr and run.steps == 20
    batch = run.batch(1)
    assert torch.isfinite(run.train_step(batch))
    assert torch.isfinite(run.train_step(run.corrupt(run.batch(2), "x1e3_batch")))
    assert run.safe.stats()["steps"] == 2 and math.isfinite(run.evaluate())


def test_hf_trainer_recipe() -> None:
    why = hf_unavailable()
    if why:
        pytest.skip(f"the hf_trainer recipe needs transformers: {why}")
    record = run_one("hf_trainer", "safe_keepclip", "nan_batch", 0, steps=10)
    assert record.steps == 10 and not record.died and record.skipped >= 1
    assert record.own_clips >= 0  # Trainer's max_grad_norm stayed on
    plain = run_one("hf_trainer", "recipe", "nan_batch", 0, steps=10)
    assert plain.died and plain.initial == record.initial


def test_results_files(result: RecipeResult, tmp_path: Path) -> None:
    written = write_results(result, tmp_path, "r")
    assert str(tmp_path / "r.md") in written and str(tmp_path / "r.csv") in written
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == len(result.records)
    assert rows[0]["reference"].startswith("karpathy/nanoGPT") and rows[0]["machine"]
    text = format_markdown(result)
    assert "## Verdict" in text and "| nanogpt | safe_keepclip |" in text
    assert "n/a (no clip in the reference)" in text


def test_cli_recipes_quick(tmp_path: Path) -> None:
    from stableopt.cli import main

    argv = ["bench", "--recipes", "--quick", "--names", "resnet", "--steps", "10"]
    assert main([*argv, "--faults", "healthy", "--no-progress", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "recipes-quick.md").read_text()
    assert "command: `python -m stableopt bench --recipes --quick --names resnet" in text
    # both resnet rows, recipe and safe_default (the others do not apply), one seed
    assert len(list(csv.DictReader((tmp_path / "recipes-quick.csv").open()))) == 4
