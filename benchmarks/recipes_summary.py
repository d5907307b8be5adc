"""The real-recipes benchmark's verdicts: one :class:`Cell` per (recipe, variant, fault).

The targets, checked on every seed (a seed that misses is a miss):

- **healthy**: ``safe_keepclip`` and ``safe_clip`` end at most :data:`MAX_HEALTHY_RATIO`
  (1.01) x the held-out loss of ``recipe``; ``safe_default`` at most 1.01 x
  ``recipe_noclip``'s (``recipe``'s where the recipe has no clip); every SafeOptimizer
  variant makes 0 rollbacks and 0 LR cuts and skips at most :data:`MAX_SKIPPED` (0.5%)
  of its steps;
- **under a fault**: every SafeOptimizer variant stays alive (no ``DivergenceError``, a
  finite held-out loss) and ends at most :data:`MAX_FAULT_RATIO` (1.05) x the fault-free
  run of the same variant and seed. The ratio to the healthy ``recipe`` is reported next
  to it, and so is what ``recipe`` and ``recipe_noclip`` do under the fault (no target:
  they may die, which is the point).

A ratio is ``final / reference final`` per seed: ``inf`` when the run died, ``0`` when
only the reference died, NaN when the reference was not run (that ratio is not judged).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.recipes import RECIPES, RecipeRecord

__all__ = [
    "MAX_FAULT_RATIO",
    "MAX_HEALTHY_RATIO",
    "MAX_SKIPPED",
    "Cell",
    "clip_costs",
    "ratio",
    "reference_variant",
    "summarize",
]

MAX_HEALTHY_RATIO = 1.01
MAX_FAULT_RATIO = 1.05
MAX_SKIPPED = 0.005


def ratio(run: RecipeRecord | None, reference: RecipeRecord | None) -> float:
    """``run.final / reference.final`` (``inf``: ``run`` died; ``0``: only the reference did)."""
    if run is None or reference is None:
        return math.nan
    if run.died:
        return math.inf
    if reference.died:
        return 0.0
    return run.final / reference.final if reference.final > 0 else math.nan


def reference_variant(recipe: str, variant: str) -> str | None:
    """The healthy variant ``variant``'s healthy run is judged against (``None``: no target)."""
    if variant in ("safe_keepclip", "safe_clip"):
        return "recipe"
    if variant == "safe_default":
        return "recipe_noclip" if RECIPES[recipe].clip > 0 else "recipe"
    return None


@dataclass
class Cell:
    """One (recipe, variant, fault) over its seeds, and its verdict."""

    recipe: str
    variant: str
    fault: str
    seeds: int
    deaths: int
    divergence_errors: int
    reference: str  # what ``ratios`` divide by, in words ("" when nothing)
    ratios: list[float]  # per seed: healthy: / reference variant; fault: / same variant healthy
    ratios_to_recipe: list[float]  # per seed: / the healthy ``recipe``
    initial: float  # medians over seeds
    final: float
    skipped_share: float  # the worst seed's skipped steps / steps
    skipped: int  # summed over seeds
    spike_skips: int
    rollbacks: int
    lr_cuts: int
    lr_recoveries: int
    clipped_share: float  # median over seeds of SafeOptimizer's clipped steps / steps
    emergency_clips: int
    own_clipped_share: float | None  # median share of steps the recipe's own clip scaled
    buffer_restores: int
    misses: list[str] = field(default_factory=list)
    failing_seeds: list[int] = field(default_factory=list)

    @property
    def is_safe(self) -> bool:
        return self.variant.startswith("safe_")

    @property
    def has_target(self) -> bool:
        """SafeOptimizer variants are judged; ``recipe`` and ``recipe_noclip`` are shown."""
        return self.is_safe

    @property
    def met(self) -> bool:
        return not self.misses

    @property
    def ratio_median(self) -> float:
        return _median(self.ratios)

    @property
    def ratio_to_recipe_median(self) -> float:
        return _median(self.ratios_to_recipe)


def _median(values: Sequence[float]) -> float:
    finite_or_inf = [v for v in values if not math.isnan(v)]
    return statistics.median(finite_or_inf) if finite_or_inf else math.nan


def summarize(records: Sequence[RecipeRecord]) -> list[Cell]:
    """One :class:`Cell` per (recipe, variant, fault), in the order of ``records``."""
    by: dict[tuple[str, str, str], dict[int, RecipeRecord]] = {}
    for r in records:
        by.setdefault((r.recipe, r.variant, r.fault), {})[r.seed] = r
    cells = []
    for (recipe, variant, fault), seeds in by.items():
        runs = [seeds[s] for s in sorted(seeds)]
        if fault == "healthy":
            ref_variant = reference_variant(recipe, variant)
            ref = by.get((recipe, ref_variant, "healthy"), {}) if ref_variant else {}
            reference = ref_variant or ""
        else:
            ref = by.get((recipe, variant, "healthy"), {})
            reference = f"{variant} healthy"
        recipe_healthy = by.get((recipe, "recipe", "healthy"), {})
        own = [r.own_clips / r.steps for r in runs if r.own_clips >= 0]
        cell = Cell(
            recipe,
            variant,
            fault,
            len(runs),
            sum(r.died for r in runs),
            sum(_diverged(r) for r in runs),
            reference,
            [ratio(r, ref.get(r.seed)) for r in runs] if reference else [],
            [ratio(r, recipe_healthy.get(r.seed)) for r in runs],
            statistics.median(r.initial for r in runs),
            _median([r.final for r in runs]),
            max(r.skipped / r.steps for r in runs),
            sum(r.skipped for r in runs),
            sum(r.spike_skips for r in runs),
            sum(r.rollbacks for r in runs),
            sum(r.lr_cuts for r in runs),
            sum(r.lr_recoveries for r in runs),
            statistics.median(r.clips / r.steps for r in runs),
            sum(r.emergency_clips for r in runs),
            statistics.median(own) if own else None,
            sum(r.buffer_restores for r in runs),
        )
        if cell.is_safe:
            cell.misses, cell.failing_seeds = _misses(cell, runs)
        cells.append(cell)
    return cells


def _diverged(run: RecipeRecord) -> bool:
    return run.error.startswith("DivergenceError")


def _misses(cell: Cell, runs: list[RecipeRecord]) -> tuple[list[str], list[int]]:
    misses: list[str] = []
    failing: set[int] = set()
    if cell.deaths:
        crashes = [r.error.split(" at step")[0] for r in runs if r.error and not _diverged(r)]
        what = [f"{cell.divergence_errors} DivergenceError"] if cell.divergence_errors else []
        what += [f"{len(crashes)} crashed ({', '.join(sorted(set(crashes)))})"] if crashes else []
        nan = cell.deaths - cell.divergence_errors - len(crashes)
        what += [f"{nan} non-finite held-out loss"] if nan else []
        misses.append(f"died in {cell.deaths}/{cell.seeds} seeds ({'; '.join(what)})")
        failing |= {r.seed for r in runs if r.died}
    limit = MAX_HEALTHY_RATIO if cell.fault == "healthy" else MAX_FAULT_RATIO
    # NaN: the reference run is not in the table (not judged)
    over = [(r.seed, x) for r, x in zip(runs, cell.ratios) if x > limit and not r.died]
    if over:
        worst = max(x for _, x in over)
        misses.append(
            f"ratio to {cell.reference} above {limit} in {len(over)}/{cell.seeds} seeds "
            f"(worst {worst:.3f})"
        )
        failing |= {s for s, _ in over}
    if cell.fault == "healthy":
        if cell.rollbacks:
            misses.append(f"{cell.rollbacks} rollback(s)")
            failing |= {r.seed for r in runs if r.rollbacks}
        if cell.lr_cuts:
            misses.append(f"{cell.lr_cuts} LR cut(s)")
            failing |= {r.seed for r in runs if r.lr_cuts}
        if cell.skipped_share > MAX_SKIPPED:
            misses.append(f"skipped {cell.skipped_share:.1%} of steps (worst seed; target <= 0.5%)")
            failing |= {r.seed for r in runs if r.skipped / r.steps > MAX_SKIPPED}
    return misses, sorted(failing)


def clip_costs(records: Sequence[RecipeRecord]) -> dict[str, list[float]]:
    """Per recipe with a clip: ``recipe_noclip / recipe`` healthy held-out loss, per seed."""
    healthy = {(r.recipe, r.variant, r.seed): r for r in records if r.fault == "healthy"}
    costs: dict[str, list[float]] = {}
    for (recipe, variant, seed), run in healthy.items():
        if variant == "recipe_noclip" and (recipe, "recipe", seed) in healthy:
            costs.setdefault(recipe, []).append(ratio(run, healthy[(recipe, "recipe", seed)]))
    return costs
