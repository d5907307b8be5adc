"""The do-no-harm benchmark: what SafeOptimizer(X) costs when training is healthy.

``python -m stableopt bench --harm`` trains every healthy configuration of
:mod:`benchmarks.harm_cases` twice per seed, with plain X and with
``SafeOptimizer(X)`` at its defaults (the loss through ``SafeLoss(loss,
optimizer=opt)``), from the same initial weights on the same batches in the same
order, under the same LR schedule. Nothing is injected: every intervention
SafeOptimizer makes here is a false alarm. Per run it records:

- a *death*: a :class:`~stableopt.DivergenceError`, or a non-finite final held-out loss;
- skipped steps, rollbacks and clipped steps (``total_clips / steps``) from ``stats()``;
- LR changes from ``events()``: *cuts* (the LR factor went down: ``lr_cut``,
  ``plateau``) separately from *recoveries* (it went back up);
- the final held-out loss, and per seed the ratio safe / plain.

The targets, per configuration: no death, 0 rollbacks, 0 LR cuts, at most 0.5% of
steps skipped in every seed, and a median (over seeds) held-out loss ratio of at most
1.01. :mod:`benchmarks.harm_report` writes the tables and the plot.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from benchmarks.harm_cases import CASES, QUICK_CASES, HarmCase
from benchmarks.pool import run_jobs
from benchmarks.training import make_inner, make_scheduler, train
from stableopt import Event, Monitor, SafeLoss, SafeOptimizer

__all__ = [
    "CASES",
    "MAX_RATIO",
    "MAX_SKIPPED",
    "QUICK_CASES",
    "CaseSummary",
    "HarmConfig",
    "HarmRecord",
    "HarmResult",
    "count_lr_changes",
    "run_harm",
    "run_one",
    "summarize",
]

MAX_SKIPPED = 0.005  # at most 0.5% of the steps skipped
MAX_RATIO = 1.01  # median held-out loss at most 1.01x plain X

_BY_NAME = {case.name: case for case in CASES}


@dataclass
class HarmRecord:
    """One (configuration, seed, method) run; ``method`` is ``plain`` or ``safe``."""

    case: str
    seed: int
    method: str
    steps: int
    initial: float
    final: float
    died: bool
    error: str = ""
    skipped: int = 0
    rollbacks: int = 0
    lr_cuts: int = 0
    lr_recoveries: int = 0
    clips: int = 0
    emergency_clips: int = 0
    seconds: float = 0.0
    first_events: list[str] = field(default_factory=list)  # the first few, "step kind: reason"


def count_lr_changes(events: Sequence[Event]) -> tuple[int, int]:
    """``(cuts, recoveries)`` among ``events``: an LR event whose factor went down is a
    cut (``lr_cut``, ``plateau``), one whose factor went up a recovery (``lr_recovery``).
    Events without factors count by kind."""
    cuts = recoveries = 0
    for event in events:
        old, new = event.data.get("old_factor"), event.data.get("new_factor")
        if old is not None and new is not None:
            cuts += new < old
            recoveries += new > old
        elif event.kind in ("lr_cut", "plateau"):
            cuts += 1
        elif event.kind == "lr_recovery":
            recoveries += 1
    return cuts, recoveries


def _observed(
    base: Callable[[Tensor, Tensor], Tensor], safe: SafeOptimizer
) -> Callable[[Tensor, Tensor], Tensor]:
    def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
        loss = base(pred, target)
        safe.observe_loss(loss.detach())
        return loss

    return loss_fn


def run_one(case: HarmCase, seed: int, method: str, steps: int | None = None) -> HarmRecord:
    """Train ``case`` for one seed with plain X (``method="plain"``) or SafeOptimizer(X)."""
    steps = steps or case.steps
    task = case.make_task(seed)
    model = task.make_model()
    inner = make_inner(case.optimizer, model.parameters(), case.lr)
    base = functools.partial(task.loss, reduction=case.reduction)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = base
    safe: SafeOptimizer | None = None
    if method == "safe":
        # Defaults; only the event buffer is made big enough to count every event.
        safe = SafeOptimizer(inner, monitor=Monitor(max_events=1_000_000))
        loss_fn = (
            SafeLoss(base, optimizer=safe) if case.feed == "safeloss" else _observed(base, safe)
        )
    optimizer = safe if safe is not None else inner
    scheduler = make_scheduler(optimizer, case.schedule, steps)
    outcome = train(task, model, optimizer, loss_fn, steps, scheduler=scheduler)
    record = HarmRecord(
        case.name,
        seed,
        method,
        steps,
        outcome.initial,
        outcome.final,
        outcome.died,
        outcome.error,
        seconds=outcome.seconds,
    )
    if safe is not None:
        stats, events = safe.stats(), safe.events()
        record.skipped = int(stats["skipped_steps"])
        record.rollbacks = int(stats["rollbacks"])
        record.clips = int(stats["total_clips"])
        record.emergency_clips = int(stats["emergency_clips"])
        record.lr_cuts, record.lr_recoveries = count_lr_changes(events)
        record.first_events = [f"{e.step} {e.kind}: {e.reason[:140]}" for e in events[:3]]
    return record


# -- the suite --------------------------------------------------------------------


@dataclass(frozen=True)
class HarmConfig:
    """What :func:`run_harm` runs."""

    cases: tuple[str, ...] = tuple(_BY_NAME)
    seeds: int = 3
    steps: int | None = None  # override every configuration's run length
    jobs: int = 2
    threads: int = 1


@dataclass
class HarmResult:
    config: HarmConfig
    records: list[HarmRecord]
    seconds: float
    command: str = ""


def _job(name: str, seed: int, method: str, steps: int | None) -> HarmRecord:
    return run_one(_BY_NAME[name], seed, method, steps)


def run_harm(config: HarmConfig, progress: bool = True) -> HarmResult:
    """Every (configuration, seed) with plain X and with SafeOptimizer(X)."""
    unknown = [c for c in config.cases if c not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown harm configurations {unknown}; known: {sorted(_BY_NAME)}")
    started = time.perf_counter()
    jobs = [
        (name, seed, method, config.steps)
        for name in config.cases
        for seed in range(config.seeds)
        for method in ("plain", "safe")
    ]
    # The slow ones (the text models) first, so that the workers finish together.
    jobs.sort(key=lambda job: _BY_NAME[job[0]].model in ("mlp", "cnn-bn"))
    records = run_jobs(
        _job,
        jobs,
        workers=config.jobs,
        threads=config.threads,
        progress=progress,
        label=lambda r: f"{r.case}/{r.method}",
    )
    order = {name: i for i, name in enumerate(config.cases)}
    records.sort(key=lambda r: (order[r.case], r.seed, r.method))
    return HarmResult(config, records, time.perf_counter() - started)


# -- per configuration ------------------------------------------------------------


@dataclass
class CaseSummary:
    """One configuration over its seeds, and its verdicts."""

    case: HarmCase
    seeds: int
    plain_deaths: int
    safe_deaths: int
    divergence_errors: int
    skipped_share: float  # the worst seed's skipped steps / steps
    rollbacks: int  # summed over seeds
    lr_cuts: int
    lr_recoveries: int
    clipped_share: float  # median over seeds of total_clips / steps
    ratios: list[float]  # per seed: safe / plain final held-out loss
    plain_final: float  # median over seeds
    safe_final: float
    misses: list[str]  # the targets missed, in words; empty when every one is met

    @property
    def ratio_median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan

    @property
    def met(self) -> bool:
        return not self.misses


def _ratio(safe: HarmRecord, plain: HarmRecord) -> float:
    if safe.died:  # a DivergenceError ends the user's run, whatever its last loss
        return math.inf
    if plain.died:
        return 0.0  # plain X died, SafeOptimizer did not
    return safe.final / plain.final if plain.final > 0 else math.nan


def summarize(records: Sequence[HarmRecord]) -> list[CaseSummary]:
    """One :class:`CaseSummary` per configuration, in the order of ``records``."""
    pairs: dict[str, dict[int, dict[str, HarmRecord]]] = {}
    for r in records:
        pairs.setdefault(r.case, {}).setdefault(r.seed, {})[r.method] = r
    summaries = []
    for name, seeds in pairs.items():
        complete = [(s["safe"], s["plain"]) for s in seeds.values() if {"safe", "plain"} <= set(s)]
        safes = [s for s, _ in complete]
        ratios = [_ratio(s, p) for s, p in complete]
        summary = CaseSummary(
            _BY_NAME[name],
            len(complete),
            sum(p.died for _, p in complete),
            sum(s.died for s in safes),
            sum(bool(s.error) for s in safes),
            max((s.skipped / s.steps for s in safes), default=0.0),
            sum(s.rollbacks for s in safes),
            sum(s.lr_cuts for s in safes),
            sum(s.lr_recoveries for s in safes),
            statistics.median(s.clips / s.steps for s in safes) if safes else 0.0,
            ratios,
            statistics.median(p.final for _, p in complete) if complete else math.nan,
            statistics.median(s.final for s in safes) if safes else math.nan,
            [],
        )
        summary.misses = _misses(summary)
        summaries.append(summary)
    return summaries


def _misses(s: CaseSummary) -> list[str]:
    misses = []
    if s.safe_deaths:
        what = f"{s.divergence_errors} DivergenceError" if s.divergence_errors else "non-finite"
        misses.append(f"died in {s.safe_deaths}/{s.seeds} seeds ({what})")
    if s.rollbacks:
        misses.append(f"{s.rollbacks} rollback(s)")
    if s.lr_cuts:
        misses.append(f"{s.lr_cuts} LR cut(s)")
    if s.skipped_share > MAX_SKIPPED:
        misses.append(f"skipped {s.skipped_share:.1%} of steps (worst seed; target <= 0.5%)")
    if not s.ratio_median <= MAX_RATIO:  # NaN/inf miss too
        misses.append(f"median loss ratio {s.ratio_median:.3f} (target <= {MAX_RATIO})")
    return misses
