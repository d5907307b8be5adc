"""The stability benchmark's results: the Markdown report, the CSV and the plot's file.

See :mod:`benchmarks.stability` for the runs, :mod:`benchmarks.stability_summary`
for the per-cell summaries and :mod:`benchmarks.stability_plot` for the plot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from benchmarks.stability import StabilityResult
from benchmarks.stability_methods import ABLATIONS
from benchmarks.stability_plot import plot_ratios
from benchmarks.stability_scenarios import FAMILIES, SCENARIOS
from benchmarks.stability_summary import Cell, format_ratio, summarize

__all__ = [
    "CLEAN_WITHIN",
    "HEADLINE",
    "SURVIVE_WITHIN",
    "format_markdown",
    "target_verdicts",
    "write_results",
]


# -- report -----------------------------------------------------------------------

HEADLINE = (
    "adamw",
    "adamw+clip",
    "adamw+clip+skip",
    "zclip",
    "autoclip",
    "olmo-skipstep",
    "arc",
    "stabilityguard",
    "safe",
)
SURVIVE_WITHIN = 1.05  # SafeOptimizer's target: every scenario within 5% of the clean run
CLEAN_WITHIN = 0.01  # and on the clean scenario within 1% of plain AdamW
BETTER_BY = 0.001  # a method beats SafeOptimizer in a cell by more than seed noise's rounding


def _fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    if cell.diverged == cell.seeds:
        return f"**diverged** {cell.diverged}/{cell.seeds}"
    text = f"{format_ratio(cell.ratio_median)} [{format_ratio(cell.ratio_min)}–{format_ratio(cell.ratio_max)}]"
    if cell.diverged:
        text += f" **{cell.diverged}/{cell.seeds} div**"
    return text


def _table(cells: list[Cell], methods: Sequence[str], rows: list[tuple[str, str]]) -> list[str]:
    index = {(c.family, c.scenario, c.method): c for c in cells}
    methods = [m for m in methods if any(c.method == m for c in cells)]
    lines = [
        "| family | scenario | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for family, scenario in rows:
        row = [_fmt_cell(index.get((family, scenario, m))) for m in methods]
        lines.append(f"| {family} | {scenario} | " + " | ".join(row) + " |")
    return lines


def target_verdicts(cells: list[Cell]) -> list[tuple[str, str, bool, str]]:
    """(family, scenario, met, why) for SafeOptimizer with defaults."""
    verdicts = []
    for c in cells:
        if c.method != "safe":
            continue
        if c.diverged:
            verdicts.append(
                (c.family, c.scenario, False, f"diverged in {c.diverged}/{c.seeds} seeds")
            )
        elif c.scenario == "clean":
            worst = max(abs(c.ratio_min - 1), abs(c.ratio_max - 1))
            ok = worst <= CLEAN_WITHIN
            verdicts.append((c.family, c.scenario, ok, f"worst seed {worst:+.2%} off plain AdamW"))
        else:
            ok = c.ratio_max <= SURVIVE_WITHIN
            verdicts.append(
                (
                    c.family,
                    c.scenario,
                    ok,
                    f"worst seed ratio {format_ratio(c.ratio_max)} (target <= 1.05)",
                )
            )
    return verdicts


def format_markdown(result: StabilityResult) -> str:
    """The Markdown report: set-up, target verdicts, the comparison, ablation and interventions."""
    import platform

    cells = summarize(result.records)
    rows = list(dict.fromkeys((c.family, c.scenario) for c in cells))
    config = result.config
    lines = [
        "# Stability benchmark",
        "",
        f"- command: `{result.command or 'run_stability(...)'}`",
        f"- run time: {result.seconds:.0f} s ({config.jobs} worker process(es), {config.threads} torch thread(s) each)",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{_cpu_count()} CPU cores (shared with other jobs while this ran)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- seeds: {config.seeds} (0..{config.seeds - 1}); steps: "
        + ", ".join(
            f"{f} {(config.steps or {}).get(f, FAMILIES[f].steps)}" for f in config.families
        ),
        "- families: `mlp` = RegressionTask (tanh MLP 8-32-32-1, MSE, batch 64, AdamW lr 1e-2); "
        "`lm` = 2-layer TransformerEncoder, d=32, vocab 64, seq 16, noisy copy language "
        "(10% random targets), cross-entropy, batch 16, AdamW lr 1e-2; `cnn` = 2 conv layers "
        "with BatchNorm on 10-class 12x12 synthetic images, cross-entropy, batch 64, AdamW "
        "lr 3e-3, held-out loss in eval mode",
        "- every method runs under the same LR schedule: 5% linear warm-up, cosine decay to "
        "10% of the peak (the `plateau` scenario: constant LR), stepped every loop step, "
        "skipped steps included",
        "- baselines: `adamw+clip` = `clip_grad_norm_(1.0)`; `adamw+clip+skip` also skips a "
        "step whose loss or norm is not finite; `zclip` = the `zclip` package's `ZClip()` "
        "defaults; `autoclip` = clip to the 10th percentile of all past norms; "
        "`olmo-skipstep` = OLMo-core's `SkipStepAdamW` fed the loss and the pre-clip norm "
        "after `clip_grad_norm_(1.0)`, as its trainer does",
        "- peers (tools a user would pick instead, wired as their READMEs show): `arc` = "
        "`arc-training`'s `arc.Controller(model, optimizer, scheduler=scheduler)`, "
        "`action = controller.step(loss)` after `backward()`, `optimizer.step()` unless "
        "`action.should_skip` (its defaults: rollback + LR x0.5 on a detected failure); "
        "`stabilityguard` = `GuardedOptimizer(AdamW, model)` with its defaults (skip a step "
        "on NaN/Inf or a 10x per-layer gradient-norm spike against an EMA baseline)",
        *(f"- **{m} not run**: {why}" for m, why in result.unavailable.items()),
        "",
        "Each cell: final held-out loss / held-out loss of plain AdamW on the clean run of the "
        "same task and seed (the `plateau` scenario: plain AdamW on the plateau task), "
        "median [min–max] over seeds. **diverged**: non-finite final loss or DivergenceError "
        "(ratio inf). Lower is better; 1.000 = as good as a fault-free plain run.",
        "",
        "## Scenarios",
        "",
    ]
    for s in config.scenarios:
        lines.append(f"- `{s}`: {SCENARIOS[s].description}")
    lines += ["", "## Target: SafeOptimizer (defaults) survives and ends within 5% (clean: 1%)", ""]
    verdicts = target_verdicts(cells)
    lines += ["| family | scenario | met | detail |", "|---|---|---|---|"]
    for family, scenario, ok, why in verdicts:
        lines.append(f"| {family} | {scenario} | {'yes' if ok else '**NO**'} | {why} |")
    missed = [v for v in verdicts if not v[2]]
    lines += [
        "",
        f"Met in {len(verdicts) - len(missed)} of {len(verdicts)} cells."
        + (" Missed: " + ", ".join(f"{f}/{s}" for f, s, _, _ in missed) + "." if missed else ""),
        "",
        "## SafeOptimizer vs the alternatives (loss ratio)",
        "",
    ]
    lines += _table(cells, HEADLINE, rows)
    lines += ["", *_where_others_do_better(cells, rows)]
    lines += ["", "## Ablation: SafeOptimizer with one stage off (loss ratio)", ""]
    lines += _table(cells, ["safe"] + [m.name for m in ABLATIONS], rows)
    lines += [
        "",
        "## Interventions (median per run: steps skipped / rollbacks / LR cuts)",
        "",
    ]
    index = {(c.family, c.scenario, c.method): c for c in cells}
    counted = [
        m
        for m in (
            "adamw+clip+skip",
            "olmo-skipstep",
            "arc",
            "stabilityguard",
            "safe",
            *[a.name for a in ABLATIONS],
        )
    ]
    counted = [m for m in counted if any(c.method == m for c in cells)]
    lines += [
        "| family | scenario | " + " | ".join(counted) + " |",
        "|---|---|" + "---|" * len(counted),
    ]
    for family, scenario in rows:
        row = []
        for m in counted:
            c = index.get((family, scenario, m))
            row.append("–" if c is None else f"{c.skipped:g} / {c.rollbacks:g} / {c.lr_cuts:g}")
        lines.append(f"| {family} | {scenario} | " + " | ".join(row) + " |")
    errors = sorted({(r.family, r.scenario, r.method, r.error) for r in result.records if r.error})
    if errors:
        lines += ["", "## DivergenceErrors", ""]
        lines += [f"- {f}/{s}/{m}: {e}" for f, s, m, e in errors[:40]]
    return "\n".join(lines) + "\n"


def _where_others_do_better(cells: list[Cell], rows: list[tuple[str, str]]) -> list[str]:
    """The cells where a baseline or a peer beats SafeOptimizer (defaults): fewer diverged
    seeds, or as few and a median loss ratio lower by more than 0.1%."""
    index = {(c.family, c.scenario, c.method): c for c in cells}
    found = []
    for family, scenario in rows:
        safe = index.get((family, scenario, "safe"))
        if safe is None:
            continue
        for m in HEADLINE:
            other = index.get((family, scenario, m))
            if m == "safe" or other is None:
                continue
            fewer = other.diverged < safe.diverged
            lower = other.diverged == safe.diverged and other.ratio_median < safe.ratio_median * (
                1 - BETTER_BY
            )
            if fewer or lower:
                found.append(
                    f"- {family}/{scenario}: **{m}** {_fmt_cell(other)} vs safe {_fmt_cell(safe)}"
                )
    heading = "## Where another method does better than SafeOptimizer (defaults)"
    if not found:
        return [heading, "", "Nowhere: in every cell SafeOptimizer is at least as good."]
    return [
        heading,
        "",
        "Fewer diverged seeds, or as few and a median loss ratio lower by more than 0.1%:",
        "",
        *found,
    ]


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def write_results(result: StabilityResult, out: str, stem: str = "stability") -> list[str]:
    """Write ``<stem>.md``, ``<stem>.csv`` and (with matplotlib) ``<stem>.png`` under ``out``."""
    import csv
    from pathlib import Path

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    md = folder / f"{stem}.md"
    body = format_markdown(result)
    png = plot_ratios(result, folder / f"{stem}.png")
    if png:
        body += f"\n![loss ratio per scenario and method]({Path(png).name})\n"
    md.write_text(body)
    written.append(str(md))
    path = folder / f"{stem}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "family",
                "scenario",
                "method",
                "seed",
                "held_out_loss",
                "reference_loss",
                "ratio",
                "diverged",
                "steps_skipped",
                "rollbacks",
                "lr_cuts",
                "error",
            ]
        )
        for r in result.records:
            writer.writerow(
                [
                    r.family,
                    r.scenario,
                    r.method,
                    r.seed,
                    f"{r.held_out:.6g}",
                    f"{r.reference:.6g}",
                    f"{r.ratio:.6g}",
                    int(r.diverged),
                    r.skipped,
                    r.rollbacks,
                    r.lr_cuts,
                    r.error,
                ]
            )
    written.append(str(path))
    if png:
        written.append(png)
    return written
