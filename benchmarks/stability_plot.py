"""The stability benchmark's plot: a heat map of the median loss ratio per cell (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.stability import StabilityResult
from benchmarks.stability_summary import format_ratio, summarize

__all__ = ["plot_ratios"]


def plot_ratios(result: StabilityResult, path: str | Path) -> str | None:
    """Draw the median loss ratio of each (family/scenario, method) cell into ``path``.

    Log10 colour scale, diverged cells black. Returns ``str(path)``, or ``None`` (and draws
    nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = summarize(result.records)
    rows = list(dict.fromkeys((c.family, c.scenario) for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    index = {(c.family, c.scenario, c.method): c for c in cells}
    data = torch.full((len(rows), len(methods)), math.nan)
    for i, (f, s) in enumerate(rows):
        for j, m in enumerate(methods):
            c = index.get((f, s, m))
            if c is not None and math.isfinite(c.ratio_median):
                data[i, j] = math.log10(max(c.ratio_median, 1e-3))
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(methods), 1.2 + 0.4 * len(rows)))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="black")
    image = ax.imshow(data.numpy(), cmap=cmap, vmin=-0.5, vmax=1.0, aspect="auto")
    for i, (f, s) in enumerate(rows):
        for j, m in enumerate(methods):
            c = index.get((f, s, m))
            if c is None:
                continue
            text = "div" if c.diverged == c.seeds else format_ratio(c.ratio_median)[:5]
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=6,
                color="white" if c.diverged == c.seeds else "black",
            )
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{f}/{s}" for f, s in rows], fontsize=7)
    fig.colorbar(image, ax=ax, label="log10 median loss ratio (black: diverged)")
    ax.set_title("held-out loss / clean plain AdamW", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
