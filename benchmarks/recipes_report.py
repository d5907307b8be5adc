"""The real-recipes benchmark's results: ``recipes.md`` (tables, verdicts, the events behind
every miss), ``recipes.csv`` (one row per run) and ``recipes.png``
(:mod:`benchmarks.recipes_plot`).

See :mod:`benchmarks.recipes` for what is run and :mod:`benchmarks.recipes_summary` for
the targets.
"""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.recipes import (
    FAULTS,
    RECIPES,
    VARIANTS,
    RecipeRecord,
    RecipeResult,
    variant_applies,
)
from benchmarks.recipes_base import FAULT_AT
from benchmarks.recipes_plot import plot_recipes
from benchmarks.recipes_summary import (
    MAX_FAULT_RATIO,
    MAX_HEALTHY_RATIO,
    Cell,
    clip_costs,
    summarize,
)
from benchmarks.report_common import machine_lines
from benchmarks.tasks_text import CORPUS_CHARS

__all__ = ["format_markdown", "write_results"]


def _num(x: float) -> str:
    if math.isnan(x):
        return "–"
    if not math.isfinite(x):
        return "died"
    return f"{x:.3f}" if x < 100 else f"{x:.3g}"


def _spread(values: list[float], median: float) -> str:
    text = _num(median)
    shown = [v for v in values if not math.isnan(v)]
    if len(shown) > 1 and min(shown) != max(shown):
        text += f" [{_num(min(shown))}–{_num(max(shown))}]"
    return text


def _versions() -> list[str]:
    lines = []
    try:
        import transformers

        lines.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "stableopt"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if head:
            lines.append(
                f"stableopt at git {head}"
                + (" with uncommitted changes in stableopt/" if dirty else "")
            )
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


def _mark(cell: Cell | None) -> str:
    if cell is None or not cell.has_target:
        return ""
    return " ✓" if cell.met else " **✗**"


def _matrix(
    cells: dict[tuple[str, str, str], Cell], names: list[str], faults: list[str]
) -> list[str]:
    head = "| recipe | variant | " + " | ".join(faults) + " |"
    lines = [head, "|---|---|" + "---:|" * len(faults)]
    for name in names:
        for variant in VARIANTS:
            row = [cells.get((name, variant, f)) for f in faults]
            if not variant_applies(RECIPES[name], variant):
                lines.append(
                    f"| {name} | {variant} | "
                    + " | ".join(
                        "n/a (no clip in the reference)" if i == 0 else "n/a"
                        for i in range(len(faults))
                    )
                    + " |"
                )
                continue
            if all(c is None for c in row):
                continue
            texts = []
            for fault, cell in zip(faults, row):
                if cell is None:
                    texts.append("–")
                    continue
                main = _num(cell.ratio_median) if cell.reference else _num(cell.final)
                if fault != "healthy":
                    main += f" ({_num(cell.ratio_to_recipe_median)})"
                if cell.deaths and cell.deaths < cell.seeds:
                    main += f", {cell.deaths}/{cell.seeds} died"
                texts.append(main + _mark(cell))
            lines.append(f"| {name} | {variant} | " + " | ".join(texts) + " |")
    return lines


def _details(cells: list[Cell]) -> list[str]:
    lines = [
        "| recipe | variant | fault | deaths | final (median) | ratio, median [min–max] "
        "| to healthy recipe | skipped (worst seed) | spike skips | rollbacks | LR cuts "
        "| LR recoveries | clipped by SafeOptimizer | emergency clips | own clip active "
        "| buffer restores | target |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        own = "–" if c.own_clipped_share is None else f"{c.own_clipped_share:.1%}"
        safe_numbers = (
            f"{c.skipped_share:.2%} | {c.spike_skips} | {c.rollbacks} | {c.lr_cuts} | "
            f"{c.lr_recoveries} | {c.clipped_share:.1%} | {c.emergency_clips}"
            if c.is_safe
            else "– | – | – | – | – | – | –"
        )
        target = ("met" if c.met else "**missed**") if c.has_target else "–"
        ratio = _spread(c.ratios, c.ratio_median) if c.reference else "–"
        lines.append(
            f"| {c.recipe} | {c.variant} | {c.fault} | {c.deaths}/{c.seeds} | {_num(c.final)} "
            f"| {ratio} | {_num(c.ratio_to_recipe_median)} | {safe_numbers} | {own} "
            f"| {c.buffer_restores if c.is_safe else '–'} | {target} |"
        )
    return lines


def _explain(cell: Cell, records: list[RecipeRecord]) -> list[str]:
    """The failing seeds' first interventions (and first clips) under a miss."""
    lines = [
        f"- **{cell.recipe} / {cell.variant} / {cell.fault}**: " + "; ".join(cell.misses) + "."
    ]
    for r in records:
        if (r.recipe, r.variant, r.fault) != (cell.recipe, cell.variant, cell.fault):
            continue
        if r.seed not in cell.failing_seeds:
            continue
        what = [
            f"final {_num(r.final)}",
            f"{r.skipped} skipped ({r.spike_skips} spikes)",
            f"{r.rollbacks} rollbacks",
            f"{r.lr_cuts} LR cuts",
            f"{r.clips} clipped (median factor {r.median_clip_factor:.3g})",
        ]
        if r.error:
            what.append(r.error)
        lines.append(f"  - seed {r.seed}: " + ", ".join(what))
        lines += [f"    - step {e}" for e in r.first_events]
        if r.clips and not r.first_events:
            lines += [f"    - step {c}" for c in r.first_clips]
    return lines


def format_markdown(result: RecipeResult) -> str:
    """The Markdown report."""
    records = result.records
    cells_list = summarize(records)
    cells = {(c.recipe, c.variant, c.fault): c for c in cells_list}
    names = list(dict.fromkeys(r.recipe for r in records))
    faults = [f for f in FAULTS if any(r.fault == f for r in records)]
    config = result.config
    judged = [c for c in cells_list if c.has_target]
    missed = [c for c in judged if not c.met]
    lines = [
        "# Real-recipes benchmark: SafeOptimizer's defaults on recipes as their authors wrote them",
        "",
        *machine_lines(
            result.command or "run_recipes(...)", result.seconds, config.jobs, config.threads
        ),
        *(f"- {v}" for v in _versions()),
        f"- seeds: {config.seeds} (0..{config.seeds - 1}); every variant of a seed starts from "
        "the same weights and sees the same batches",
        f"- text: the first {CORPUS_CHARS:,} characters of the standard library's top-level "
        "`.py` files (nanoGPT, seq2seq, hf_trainer)",
        "",
        "Each recipe is written the way its public reference writes it (architecture, "
        "optimizer and hyper-parameters, LR schedule, its own gradient clip, data handling); "
        "only sizes and step counts are scaled down to a CPU core. Variants: `recipe` (as "
        "written), `recipe_noclip` (its clip line removed), `safe_keepclip` (only the optimizer "
        "swapped for `SafeOptimizer(inner)` with defaults, the clip line kept), `safe_clip` "
        "(the clip line removed, moved into `SafeOptimizer(inner, clip=c)`), `safe_default` "
        "(the clip line removed, SafeOptimizer's defaults). SafeOptimizer gets the loss "
        "through `SafeLoss(criterion, optimizer=opt)` where the recipe's loss is one criterion "
        "(resnet, seq2seq), `opt.observe_loss(loss)` where the loss is computed inside the "
        "model or is a composition (nanoGPT, Tacotron 2), and `StableOptCallback`'s forward "
        "hook with the HF Trainer (`disable_trainer_clipping=False`: Trainer's "
        "`max_grad_norm` is the user's clip line, 1.0 where kept, 0 where removed).",
        "",
        f"Faults: `healthy`; `nan_batch`: one batch at {FAULT_AT:.0%} of the run holds a NaN "
        "(in the input images, the mel frames, or, for token models, the embedded input "
        "tokens); `x1e3_batch`: that batch multiplied by 1e3 (same places); `lr_10x`: the "
        "recipe's LR x10 for the whole run. `recipe_noclip` runs healthy only (it is the "
        "reference of `safe_default`). The held-out loss is each recipe's own loss metric on "
        "a fixed held-out set, read in `eval()` mode (BatchNorm's running statistics, no "
        "dropout except Tacotron's prenet, whose dropout stays on by design, from a fixed RNG "
        "state): a BatchNorm buffer poisoned by a NaN batch shows as a NaN loss (died).",
        "",
        f"Targets, every seed: healthy, `safe_keepclip` and `safe_clip` at most "
        f"{MAX_HEALTHY_RATIO}x `recipe`, `safe_default` at most {MAX_HEALTHY_RATIO}x "
        "`recipe_noclip` (`recipe` where there is no clip), every SafeOptimizer variant 0 "
        "rollbacks, 0 LR cuts and at most 0.5% of steps skipped; under a fault, every "
        f"SafeOptimizer variant alive and at most {MAX_FAULT_RATIO}x its own fault-free run "
        "(same variant and seed).",
        "",
        "## Recipes",
        "",
        "| recipe | reproduces | scaled down | steps | own clip |",
        "|---|---|---|---:|---|",
        *(
            f"| {n} | {RECIPES[n].reference} | {RECIPES[n].scaled} "
            f"| {config.steps or RECIPES[n].steps} "
            f"| {'clip_grad_norm_(' + format(RECIPES[n].clip, 'g') + ')' if RECIPES[n].clip else 'none'} |"
            for n in names
        ),
        "",
        "## Verdict",
        "",
    ]
    if result.skipped_recipes:
        lines += [f"- not run: {n} ({why})" for n, why in result.skipped_recipes.items()] + [""]
    if missed:
        lines.append(
            f"**Targets missed in {len(missed)} of {len(judged)} SafeOptimizer cells** "
            "(recipe x variant x fault); met in "
            f"{len(judged) - len(missed)}."
        )
    else:
        lines.append(f"Every target met in all {len(judged)} SafeOptimizer cells.")
    costs = clip_costs(records)
    if costs:
        lines += [
            "",
            "What dropping the recipe's clip costs, healthy (`recipe_noclip` / `recipe`):",
            "",
        ]
        for name, values in costs.items():
            median = sorted(values)[len(values) // 2]
            lines.append(f"- {name}: {_spread(values, median)}")
    hotter = [
        f"{c.recipe} ({_num(c.ratio_median)})"
        for c in cells_list
        if c.variant == "recipe" and c.fault == "lr_10x" and c.ratio_median < 1
    ]
    if hotter:
        lines += [
            "",
            "`lr_10x` is no fault where the recipe as written ends *lower* with the LR x10 than "
            "with its own (the scaled-down run is short for the recipe's LR): "
            + ", ".join(hotter)
            + " (median ratio to its healthy run). There the `lr_10x` column judges only "
            "that SafeOptimizer does not get in the way.",
        ]
    lines += [
        "",
        "## All cells",
        "",
        "Median over seeds. `healthy`: the held-out loss ratio to the variant's reference "
        "(`recipe` for `safe_keepclip`/`safe_clip`, `recipe_noclip` for `safe_default`; "
        "`recipe` and `recipe_noclip` show their final loss); faults: the ratio to the same "
        "variant's fault-free run, and in parentheses to the healthy `recipe`. `died`: every "
        "seed died; ✓/✗: the cell's targets (SafeOptimizer variants only).",
        "",
        *_matrix(cells, names, faults),
        "",
        "## Counters",
        "",
        "Skipped, spikes, rollbacks, LR cuts and recoveries, emergency clips and buffer "
        "restores are summed over seeds (skipped share: the worst seed); clipped = "
        "SafeOptimizer's `total_clips / steps`, own clip active = steps where the recipe's "
        "own clip line scaled the gradients / steps (medians over seeds).",
        "",
        *_details(cells_list),
    ]
    if missed:
        lines += [
            "",
            "## Why targets were missed",
            "",
            "The first interventions (up to 4) of every failing seed, `step kind: reason`; "
            "where a run only clipped, its first clipped steps.",
            "",
        ]
        for cell in missed:
            lines += _explain(cell, records)
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "## Runs that ended early (DivergenceError or a crash)", ""]
        lines += [
            f"- {r.recipe} / {r.variant} / {r.fault} / seed {r.seed}: {r.error}" for r in errors
        ]
    return "\n".join(lines) + "\n"


_COLUMNS = (
    "recipe",
    "variant",
    "fault",
    "seed",
    "steps",
    "initial",
    "final",
    "died",
    "error",
    "skipped",
    "spike_skips",
    "rollbacks",
    "lr_cuts",
    "lr_recoveries",
    "clips",
    "emergency_clips",
    "buffer_restores",
    "own_clips",
    "median_clip_factor",
    "seconds",
    "first_events",
)
#: per row, so that the file stands alone: what the run reproduces and where it ran
_CONTEXT = ("reference", "scaled_down", "command", "machine")


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " | ".join(value)
    return value


def write_results(result: RecipeResult, out: str | Path, stem: str = "recipes") -> list[str]:
    """Write ``<stem>.md``, ``<stem>.csv`` and (with matplotlib) ``<stem>.png`` under ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot_recipes(result, folder / f"{stem}.png") if result.records else None
    body = format_markdown(result)
    if png:
        body += f"\n![held-out loss ratio per recipe, variant and fault]({Path(png).name})\n"
    md = folder / f"{stem}.md"
    md.write_text(body, encoding="utf-8")
    path = folder / f"{stem}.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(_COLUMNS + _CONTEXT)
        machine = machine_lines(result.command, result.seconds, result.config.jobs, 1)
        where = "; ".join(line.lstrip("- ") for line in machine[2:])
        for r in result.records:
            spec = RECIPES[r.recipe]
            context = (spec.reference, spec.scaled, result.command, where)
            writer.writerow([_cell(getattr(r, c)) for c in _COLUMNS] + list(context))
    return [str(md), str(path), *([png] if png else [])]
