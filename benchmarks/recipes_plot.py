"""The real-recipes benchmark's plot: per recipe, every variant's median held-out loss ratio,
healthy (to its reference) and under each fault (to its own fault-free run), with the
1.01 and 1.05 target lines; the command, the machine and each recipe's reference on it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.recipes import FAULTS, RECIPES, VARIANTS, RecipeResult, variant_applies
from benchmarks.recipes_summary import MAX_FAULT_RATIO, MAX_HEALTHY_RATIO, summarize
from benchmarks.report_common import machine_lines, matplotlib_pyplot

__all__ = ["plot_recipes"]

_FAULT_STYLE = {
    "healthy": ("tab:green", "o"),
    "nan_batch": ("tab:red", "s"),
    "x1e3_batch": ("tab:purple", "D"),
    "lr_10x": ("tab:orange", "*"),
}


def plot_recipes(result: RecipeResult, path: str | Path) -> str | None:
    """Per recipe, the median ratio of every variant (healthy: to its reference; faults: to
    its own fault-free run) with the 1.01 and 1.05 target lines; ``None`` without matplotlib."""
    pyplot: Any = matplotlib_pyplot()
    if pyplot is None:
        return None
    cells = {(c.recipe, c.variant, c.fault): c for c in summarize(result.records)}
    names = list(dict.fromkeys(r.recipe for r in result.records))
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = pyplot.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    low, high = 0.9, 1.5  # beyond: drawn at the edge (x: died; triangle: off the scale)
    for ax, name in zip(axes.flat, names):
        variants = [v for v in VARIANTS if variant_applies(RECIPES[name], v)]
        for x, variant in enumerate(variants):
            for k, fault in enumerate(FAULTS):
                cell = cells.get((name, variant, fault))
                if cell is None or not cell.reference:
                    continue
                value = cell.ratio_median
                if math.isnan(value):
                    continue
                colour, marker = _FAULT_STYLE[fault]
                if not math.isfinite(value):
                    marker = "x"
                elif value > high:
                    marker = "^"
                elif value < low:
                    marker = "v"
                ax.scatter(
                    x + (k - 1.5) * 0.15,
                    min(max(value, low), high),
                    color=colour,
                    marker=marker,
                    s=30,
                    label=fault,
                )
        ax.axhline(MAX_HEALTHY_RATIO, color="grey", linestyle="--", linewidth=1)
        ax.axhline(MAX_FAULT_RATIO, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(low * 0.99, high * 1.02)
        ticks = [0.9, 1.0, 1.05, 1.1, 1.2, 1.5]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks[:-1]] + [">=1.5"])
        ax.minorticks_off()
        ax.set_xticks(range(len(variants)), [v.replace("_", "\n", 1) for v in variants], fontsize=7)
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.set_title(f"{name}\n{RECIPES[name].short}", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.collections}
    fig.legend(
        [handles[f] for f in FAULTS if f in handles],
        [f for f in FAULTS if f in handles],
        loc="lower right",
        ncol=4,
        fontsize=8,
    )
    fig.suptitle(
        "Held-out loss ratio, median of seeds: healthy / the variant's reference, faults / the "
        "same variant healthy (x = died; triangles: beyond the axis; dashed 1.01, dotted 1.05)",
        fontsize=9,
    )
    machine = machine_lines(result.command or "run_recipes(...)", result.seconds, 1, 1)
    fig.text(
        0.01,
        0.005,
        "\n".join(line.lstrip("- ") for line in (machine[0], machine[2], machine[3])),
        fontsize=6,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return str(path)
