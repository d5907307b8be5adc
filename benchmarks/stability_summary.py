"""Per-cell summaries of the stability benchmark: one :class:`Cell` per (family, scenario, method)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.stability import RunRecord

__all__ = ["Cell", "format_ratio", "summarize"]


@dataclass
class Cell:
    """One (family, scenario, method) over its seeds."""

    family: str
    scenario: str
    method: str
    seeds: int
    diverged: int
    ratio_median: float
    ratio_min: float
    ratio_max: float
    skipped: float
    rollbacks: float
    lr_cuts: float


def summarize(records: Sequence[RunRecord]) -> list[Cell]:
    """One :class:`Cell` per (family, scenario, method), in the order of ``records``."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.family, r.scenario, r.method), []).append(r)
    cells = []
    for (family, scenario, method), rs in groups.items():
        ratios = [r.ratio for r in rs]
        cells.append(
            Cell(
                family,
                scenario,
                method,
                len(rs),
                sum(r.diverged for r in rs),
                statistics.median(ratios),
                min(ratios),
                max(ratios),
                statistics.median(r.skipped for r in rs),
                statistics.median(r.rollbacks for r in rs),
                statistics.median(r.lr_cuts for r in rs),
            )
        )
    return cells


def format_ratio(x: float) -> str:
    """A loss ratio for a table cell: 3 decimals below 100, 3 significant digits above."""
    if math.isinf(x):
        return "inf"
    return f"{x:.3f}" if x < 100 else f"{x:.3g}"
