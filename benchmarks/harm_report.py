"""The do-no-harm benchmark's results: ``harm.md`` (tables, verdicts), ``harm.csv``, ``harm.png``.

See :mod:`benchmarks.harm` for what is measured and how.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from benchmarks.harm import MAX_RATIO, CaseSummary, HarmResult, summarize
from benchmarks.report_common import machine_lines, matplotlib_pyplot
from benchmarks.tasks_text import CORPUS_CHARS, corpus_files

__all__ = ["format_markdown", "plot_harm", "write_results"]


def _ratio_text(s: CaseSummary) -> str:
    if not s.ratios:
        return "–"
    text = _num(s.ratio_median)
    if len(s.ratios) > 1:
        text += f" [{_num(min(s.ratios))}–{_num(max(s.ratios))}]"
    return text


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3f}" if x < 100 else f"{x:.3g}"


def _table(summaries: list[CaseSummary]) -> list[str]:
    lines = [
        "| configuration | model | optimizer, lr | schedule | loss | plain deaths | safe deaths "
        "| skipped (worst seed) | rollbacks | LR cuts | LR recoveries | clipped (median) "
        "| loss ratio safe/plain, median [min–max] | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        c = s.case
        name = f"**{c.name}**" if c.hard else c.name
        lines.append(
            f"| {name} | {c.model} | {c.optimizer}, {c.lr:g} | {c.schedule} | {c.reduction} "
            f"| {s.plain_deaths}/{s.seeds} | {s.safe_deaths}/{s.seeds} | {s.skipped_share:.2%} "
            f"| {s.rollbacks} | {s.lr_cuts} | {s.lr_recoveries} | {s.clipped_share:.1%} "
            f"| {_ratio_text(s)} | {'met' if s.met else '**missed**'} |"
        )
    return lines


def format_markdown(result: HarmResult) -> str:
    """The Markdown report: set-up, the verdict, the table per configuration, why missed."""
    summaries = summarize(result.records)
    config = result.config
    missed = [s for s in summaries if not s.met]
    files = corpus_files()
    lines = [
        "# Do-no-harm benchmark: SafeOptimizer(X) on healthy training",
        "",
        *machine_lines(
            result.command or "run_harm(...)", result.seconds, config.jobs, config.threads
        ),
        f"- seeds: {config.seeds} (0..{config.seeds - 1}); steps: each configuration's own"
        + (f" (overridden: {config.steps})" if config.steps else ""),
        f"- text: the first {CORPUS_CHARS:,} characters of the standard library's top-level "
        f"`.py` files in name order (from `{Path(files[0]).parent}`: {Path(files[0]).name}, "
        f"{Path(files[1]).name}, ...), 90% train / 10% held out",
        "",
        "Every configuration is healthy: no fault is injected and plain X trains on it. Per "
        "seed, plain X and `SafeOptimizer(X)` (defaults; the loss through `SafeLoss(loss, "
        "optimizer=opt)`, or `opt.observe_loss` for a custom objective) start from the same "
        "weights and see the same batches under the same LR schedule. Every intervention is "
        "therefore a false alarm.",
        "",
        "Targets per configuration: no death (no `DivergenceError`, finite final loss), 0 "
        "rollbacks, 0 LR cuts, at most 0.5% of steps skipped in every seed, median final "
        f"held-out loss at most {MAX_RATIO}x plain X's. **Bold** configurations are the ones "
        "expected (before any run) to trip absolute defaults; the table says which do. "
        "A run that died counts as ratio inf.",
        "",
        "## Verdict",
        "",
    ]
    if missed:
        lines.append(
            f"**Targets missed in {len(missed)} of {len(summaries)} configurations**; met in "
            f"{len(summaries) - len(missed)}."
        )
        lines += ["", *(f"- **{s.case.name}**: " + "; ".join(s.misses) + "." for s in missed)]
    else:
        lines.append(f"Every target met in all {len(summaries)} configurations.")
    lines += [
        "",
        "## Per configuration",
        "",
        "Counts are summed over seeds; skipped = skipped steps / steps; clipped = "
        "`total_clips / steps`; loss ratio = final held-out loss of SafeOptimizer(X) / plain "
        "X's, per seed (inf: SafeOptimizer's run died; 0: plain X's died and SafeOptimizer's "
        "did not).",
        "",
        *_table(summaries),
        "",
        "## Configurations",
        "",
        *(
            f"- `{s.case.name}`: {s.case.description}; {config.steps or s.case.steps} steps"
            for s in summaries
        ),
    ]
    firsts = [
        (r.case, r.seed, e) for r in result.records if r.method == "safe" for e in r.first_events
    ]
    if firsts:
        lines += ["", "## First interventions (up to 3 per run; seed 0 only)", ""]
        lines += [f"- {case}: step {e}" for case, seed, e in firsts if seed == 0]
    errors = [r for r in result.records if r.error]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r.case} seed {r.seed} ({r.method}): {r.error}" for r in errors]
    return "\n".join(lines) + "\n"


def plot_harm(result: HarmResult, path: str | Path) -> str | None:
    """Loss ratio and skipped share per configuration (two panels); ``None`` without matplotlib."""
    pyplot: Any = matplotlib_pyplot()
    if pyplot is None:
        return None
    summaries = summarize(result.records)
    names = [s.case.name for s in summaries]
    fig, (top, bottom) = pyplot.subplots(2, 1, figsize=(max(8, 0.45 * len(names)), 7), sharex=True)
    ceiling = 2.0  # a ratio above 2 (or a death) is drawn at the top
    for i, s in enumerate(summaries):
        colour = "tab:green" if s.met else "tab:red"
        for r in s.ratios:
            shown = min(max(r, 0.8), ceiling) if math.isfinite(r) else ceiling
            top.scatter(i, shown, color=colour, marker="x" if not math.isfinite(r) else "o", s=18)
        if math.isfinite(s.ratio_median):
            top.hlines(min(s.ratio_median, ceiling), i - 0.3, i + 0.3, color="black")
    top.axhline(MAX_RATIO, color="grey", linestyle="--", linewidth=1)
    top.set_yscale("log")
    top.set_ylim(0.8, ceiling * 1.05)
    ticks = [0.8, 0.9, 1.0, 1.2, 1.5, 2.0]
    top.set_yticks(ticks, [f"{t:g}" for t in ticks[:-1]] + [">=2 / died"])
    top.minorticks_off()
    top.set_ylabel("held-out loss, safe / plain\n(per seed; x = died; bar = median)")
    top.set_title("Do-no-harm: SafeOptimizer(X) vs plain X on healthy runs (red: targets missed)")
    skipped = [100 * s.skipped_share for s in summaries]
    bottom.bar(
        range(len(names)), skipped, color=["tab:green" if s.met else "tab:red" for s in summaries]
    )
    bottom.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    bottom.set_ylabel("steps skipped, worst seed (%)")
    bottom.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return str(path)


_COLUMNS = (
    "case",
    "seed",
    "method",
    "steps",
    "initial",
    "final",
    "died",
    "error",
    "skipped",
    "rollbacks",
    "lr_cuts",
    "lr_recoveries",
    "clips",
    "emergency_clips",
    "seconds",
)


def write_results(result: HarmResult, out: str | Path, stem: str = "harm") -> list[str]:
    """Write ``<stem>.md``, ``<stem>.csv`` and (with matplotlib) ``<stem>.png`` under ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot_harm(result, folder / f"{stem}.png")
    body = format_markdown(result)
    if png:
        body += f"\n![loss ratio and skipped steps per configuration]({Path(png).name})\n"
    md = folder / f"{stem}.md"
    md.write_text(body, encoding="utf-8")
    path = folder / f"{stem}.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(_COLUMNS)
        for r in result.records:
            row = [getattr(r, c) for c in _COLUMNS]
            writer.writerow(
                [
                    f"{v:.6g}" if isinstance(v, float) else int(v) if isinstance(v, bool) else v
                    for v in row
                ]
            )
    return [str(md), str(path), *([png] if png else [])]
