"""The LR-sensitivity sweep (Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities").

``python -m stableopt bench --lr-sweep`` trains each task under each schedule at every
learning rate of :data:`LRS` with every method of
:mod:`benchmarks.lr_sweep_methods`, on the same seeds, weights and data order, and
records the final held-out loss. A run that diverges (a non-finite loss or a
:class:`~stableopt.DivergenceError`) counts as its initial loss.

**LR sensitivity** (the paper's definition, restricted to the hot side): with
``L_m(lr)`` the mean over seeds of ``min(final loss, initial loss)`` of method ``m`` at
``lr`` (a diverged run: its initial loss), ``best_m = min over the whole sweep of
L_m(lr)`` (the *per-method* best, as in the paper) and ``H`` the learning rates from
plain AdamW's best one upward (the same ``H`` for every method of a task, so that all
are averaged over the same rates; the method's own best LR when plain AdamW was not
run),

    sensitivity_m = mean over lr in H of [L_m(lr) - best_m].

:func:`sensitivity` computes it (and the full-sweep variant over every LR);
:mod:`benchmarks.lr_sweep_report` writes the tables, the verdicts and the plot.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from benchmarks.lr_sweep_methods import SWEEP_METHODS, sweep_unavailable
from benchmarks.pool import run_jobs
from benchmarks.stability_scenarios import _WeightedLoss
from benchmarks.tasks import CharLMTask, Regression, Task
from benchmarks.training import Outcome, make_scheduler, train

__all__ = [
    "LRS",
    "MLP_LRS",
    "QUICK",
    "SCHEDULES",
    "SWEEP_METHODS",
    "TASKS",
    "Curve",
    "SweepConfig",
    "SweepRecord",
    "SweepResult",
    "curves",
    "run_sweep",
    "sensitivity",
]

#: The LM's grid: two rates below plain AdamW's best (1e-2..3e-2), then 7 from 1e-2 upward
#: over three orders of magnitude: the hot side, where a wrapper can help.
LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
#: The MLP's: its tanh units tolerate more (plain AdamW's best is 3e-2..1e-1), so the grid
#: goes on to 100 to keep three orders of magnitude above the best.
MLP_LRS: tuple[float, ...] = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0)
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class SweepTask:
    """A task of the sweep and its run length."""

    name: str
    description: str
    make: Callable[..., Task]
    steps: int
    lrs: tuple[float, ...]


TASKS: dict[str, SweepTask] = {
    t.name: t
    for t in (
        SweepTask(
            "charlm",
            "character transformer LM on the standard library's source (2 layers, d=48, "
            "seq 32, batch 16; cross-entropy, nats/char)",
            CharLMTask,
            250,
            LRS,
        ),
        SweepTask(
            "mlp",
            "MLP regression (tanh 8-32-32-1 on a sine teacher, batch 64; MSE)",
            Regression,
            300,
            MLP_LRS,
        ),
    )
}


@dataclass
class SweepRecord:
    """One (task, schedule, method, lr, seed) run."""

    task: str
    schedule: str
    method: str
    lr: float
    seed: int
    initial: float
    final: float
    diverged: bool
    error: str = ""
    skipped: int = 0
    seconds: float = 0.0

    @property
    def counted(self) -> float:
        """What enters the sensitivity: ``min(final, initial)``; a diverged run its initial loss."""
        if self.diverged or not math.isfinite(self.final):
            return self.initial
        return min(self.final, self.initial)


def train_method(
    task_name: str,
    schedule: str,
    method: str,
    lr: float,
    seed: int,
    steps: int | None = None,
    before_step: Callable[[Any, Tensor], None] | None = None,
) -> tuple[Any, Outcome]:
    """Train one method at one LR (``steps``: override the task's run length); return the
    method's runner and the outcome. ``before_step(runner, loss)`` sees every step first."""
    spec = TASKS[task_name]
    steps = steps or spec.steps
    task = spec.make(seed=seed)
    model = task.make_model()
    runner = SWEEP_METHODS[method](model, lr, _WeightedLoss(task.loss))
    scheduler = make_scheduler(runner.optimizer, schedule, steps)

    def step(loss: Tensor) -> None:
        if before_step is not None:
            before_step(runner, loss)
        runner.step(loss)

    outcome = train(
        task, model, runner.optimizer, runner.loss, steps, scheduler=scheduler, step=step
    )
    return runner, outcome


def run_one(
    task_name: str, schedule: str, method: str, lr: float, seed: int, steps: int | None = None
) -> SweepRecord:
    """Train one method at one LR (``steps``: override the task's run length)."""
    runner, outcome = train_method(task_name, schedule, method, lr, seed, steps)
    skipped = runner.counters()[0]
    return SweepRecord(
        task_name,
        schedule,
        method,
        lr,
        seed,
        outcome.initial,
        outcome.final,
        outcome.died,
        outcome.error,
        skipped,
        outcome.seconds,
    )


@dataclass(frozen=True)
class SweepConfig:
    """What :func:`run_sweep` runs."""

    tasks: tuple[str, ...] = tuple(TASKS)
    schedules: tuple[str, ...] = SCHEDULES
    methods: tuple[str, ...] = tuple(SWEEP_METHODS)
    lrs: tuple[float, ...] | None = None  # default each task's own grid
    seeds: int = 3
    steps: int | None = None  # override every task's run length
    jobs: int = 2
    threads: int = 1


QUICK = {
    "tasks": ("mlp",),
    "schedules": ("cosine",),
    "methods": ("adamw", "adamw+clip", "safe"),
    "lrs": (3e-3, 1e-2, 1e-1, 1.0),
    "seeds": 1,
    "steps": 60,
    "jobs": 1,
}


@dataclass
class SweepResult:
    config: SweepConfig
    records: list[SweepRecord]
    seconds: float
    unavailable: dict[str, str]  # method -> why it could not run here
    command: str = ""


def run_sweep(config: SweepConfig, progress: bool = True) -> SweepResult:
    """Every (task, schedule, method, lr, seed) of ``config``, ``config.jobs`` at a time."""
    started = time.perf_counter()
    unavailable = {m: why for m, why in sweep_unavailable().items() if m in config.methods}
    methods = [m for m in config.methods if m not in unavailable]
    jobs = [
        (t, s, m, lr, seed, config.steps)
        for t in config.tasks
        for s in config.schedules
        for m in methods
        for lr in config.lrs or TASKS[t].lrs
        for seed in range(config.seeds)
    ]
    jobs.sort(key=lambda job: job[0] != "charlm")  # the slow task first
    records = run_jobs(
        run_one,
        jobs,
        workers=config.jobs,
        threads=config.threads,
        progress=progress,
        label=lambda r: f"{r.task}/{r.schedule}/{r.method}/{r.lr:g}",
    )
    key = {(t, s, m): i for i, (t, s, m) in enumerate(
        (t, s, m) for t in config.tasks for s in config.schedules for m in methods
    )}  # fmt: skip
    records.sort(key=lambda r: (key[(r.task, r.schedule, r.method)], r.lr, r.seed))
    return SweepResult(config, records, time.perf_counter() - started, unavailable)


# -- the sensitivity ----------------------------------------------------------------


@dataclass
class Curve:
    """One (task, schedule, method): the counted loss per LR, and its sensitivity."""

    task: str
    schedule: str
    method: str
    losses: dict[float, float]  # lr -> mean over seeds of min(final, initial)
    diverged: dict[float, int]  # lr -> diverged seeds
    seeds: int
    best: float = math.nan  # min over the sweep of losses
    best_lr: float = math.nan
    hot_from: float = math.nan  # the first LR of the hot side
    hot: float = math.nan  # the sensitivity over the hot side
    full: float = math.nan  # over every LR of the sweep


def sensitivity(losses: dict[float, float], hot_from: float | None = None) -> tuple[float, float]:
    """``(hot-side, full-sweep)`` LR sensitivity of one method's ``lr -> loss`` curve.

    ``mean over lr >= hot_from of [loss(lr) - min(loss)]`` and the same mean over
    every LR; ``hot_from`` defaults to the curve's own best LR. The losses are already
    ``min(final, initial)`` (see the module docstring).
    """
    if not losses:
        return math.nan, math.nan
    best = min(losses.values())
    if hot_from is None:
        hot_from = min(losses, key=lambda lr: (losses[lr], lr))
    hot = [loss - best for lr, loss in losses.items() if lr >= hot_from * (1 - 1e-9)]
    full = [loss - best for loss in losses.values()]
    return (statistics.fmean(hot) if hot else math.nan), statistics.fmean(full)


def curves(records: Sequence[SweepRecord]) -> list[Curve]:
    """One :class:`Curve` per (task, schedule, method), in the order of ``records``.

    The hot side of a task and schedule starts at plain AdamW's best LR there (the
    method's own best LR when plain AdamW was not run).
    """
    groups: dict[tuple[str, str, str], dict[float, list[SweepRecord]]] = {}
    for r in records:
        groups.setdefault((r.task, r.schedule, r.method), {}).setdefault(r.lr, []).append(r)
    result = []
    for (task, schedule, method), by_lr in groups.items():
        losses = {lr: statistics.fmean(r.counted for r in rs) for lr, rs in sorted(by_lr.items())}
        diverged = {lr: sum(r.diverged for r in rs) for lr, rs in sorted(by_lr.items())}
        seeds = max(len(rs) for rs in by_lr.values())
        curve = Curve(task, schedule, method, losses, diverged, seeds)
        curve.best = min(losses.values())
        curve.best_lr = min(losses, key=lambda lr: (losses[lr], lr))
        result.append(curve)
    reference = {(c.task, c.schedule): c.best_lr for c in result if c.method == "adamw"}
    for c in result:
        c.hot_from = reference.get((c.task, c.schedule), c.best_lr)
        c.hot, c.full = sensitivity(c.losses, c.hot_from)
    return result
