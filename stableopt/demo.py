"""The demo: plain AdamW and SafeOptimizer(AdamW) through the same faults.

Both train the same MLP (same seed, same data order) on a synthetic regression
task while :mod:`stableopt.testing.faults` injects, at fixed fractions of the run,
NaN gradients, an Inf loss, a 1e5x gradient spike and an update that leaves NaN
weights. :func:`run_demo` returns the numbers; :func:`format_report` turns them
into the plain-text table that ``python -m stableopt demo`` prints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from stableopt._checks import check_float, check_int
from stableopt.loss import SafeLoss
from stableopt.monitor import Event, Monitor
from stableopt.optimizer import SafeOptimizer
from stableopt.testing.faults import FaultKind, FaultSchedule, RegressionTask, run_training

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_FAULTS",
    "DemoResult",
    "MethodResult",
    "demo_schedule",
    "format_report",
    "run_demo",
]

#: The demo's faults, as (fraction of the run, kind): one of each failure, spread out
#: so that each meets a model that trained for a while since the last one.
DEMO_FAULTS: tuple[tuple[float, FaultKind], ...] = (
    (0.20, "nan_grad"),
    (0.35, "inf_loss"),
    (0.50, "grad_spike"),
    (0.85, "nan_weights"),
)
MIN_STEPS = 10


@dataclass
class MethodResult:
    """One optimizer's run.

    Attributes:
        name: ``"AdamW"`` or ``"SafeOptimizer"``.
        first_nonfinite_step: the first step whose loss was non-finite although no
            ``inf_loss`` fault made it so (the model itself was broken), or ``None``.
        held_out_loss: MSE on the held-out set after the run (NaN for a broken model).
        losses: the training loss of every step run.
        stats: ``SafeOptimizer.stats()`` after the run; ``None`` for a plain optimizer.
        events: ``SafeOptimizer.events()`` after the run; empty for a plain optimizer.
        error: the message of the :class:`~stableopt.DivergenceError` that ended
            the run early, or ``None``.
    """

    name: str
    first_nonfinite_step: int | None
    held_out_loss: float
    losses: list[float]
    stats: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    error: str | None = None

    @property
    def broken_since(self) -> int | None:
        """The step from which every training loss was non-finite to the end, or ``None``.

        A run that met a non-finite loss and recovered (a corrupted update rolled
        back at the next step) is not broken.
        """
        step = None
        for index in range(len(self.losses), 0, -1):
            if math.isfinite(self.losses[index - 1]):
                break
            step = index
        return step

    @property
    def is_finite(self) -> bool:
        """Whether the run ended with a finite held-out loss."""
        return math.isfinite(self.held_out_loss)


@dataclass
class DemoResult:
    """Everything :func:`run_demo` measured.

    Attributes:
        steps, seed, lr: the settings of the run.
        schedule: the injected faults.
        methods: one :class:`MethodResult` per optimizer, AdamW first.
        reference_loss: held-out loss of AdamW with no faults (the same numbers as
            SafeOptimizer with no faults: it is transparent when no guard fires).
    """

    steps: int
    seed: int
    lr: float
    schedule: FaultSchedule
    methods: list[MethodResult]
    reference_loss: float

    def method(self, name: str) -> MethodResult:
        """The result of the method called ``name``."""
        for result in self.methods:
            if result.name == name:
                return result
        raise KeyError(f"no method {name!r}; the methods are {[m.name for m in self.methods]}")


def demo_schedule(steps: int) -> FaultSchedule:
    """The faults of :data:`DEMO_FAULTS` placed in a run of ``steps`` steps (``>= 10``)."""
    check_int("steps", steps, minimum=MIN_STEPS)
    return FaultSchedule({max(1, round(fraction * steps)): kind for fraction, kind in DEMO_FAULTS})


def run_demo(
    steps: int = 300,
    seed: int = 0,
    *,
    lr: float = 1e-2,
    schedule: FaultSchedule | None = None,
    safe_options: Mapping[str, Any] | None = None,
    log_dir: str | Path | None = None,
) -> DemoResult:
    """Train plain AdamW and ``SafeOptimizer(AdamW)`` side by side under the same faults.

    Args:
        steps: training steps per run (default 300, ``>= 10``).
        seed: seed of the model, the data and the NaN positions (default 0).
        lr: AdamW's learning rate (default 1e-2).
        schedule: the faults (default :func:`demo_schedule` of ``steps``).
        safe_options: keyword arguments of :class:`~stableopt.SafeOptimizer`
            (default none: its default options).
        log_dir: if given, the SafeOptimizer run logs to the sinks of
            :func:`stableopt.sinks.default_sinks` there (a JSON-lines run log, MLflow,
            TensorBoard, as installed) every 5 steps, and ``run.png`` is drawn from
            the run log when matplotlib is installed.
    """
    check_int("steps", steps, minimum=MIN_STEPS)
    check_int("seed", seed, minimum=0)
    check_float("lr", lr, minimum=0.0, inclusive_min=False)
    schedule = demo_schedule(steps) if schedule is None else schedule
    options = dict(safe_options or {})
    monitor = None
    if log_dir is not None:
        from stableopt.sinks import default_sinks

        monitor = Monitor(sinks=default_sinks(log_dir), every_steps=5)
        options["monitor"] = monitor
    task = RegressionTask(seed=seed)

    def adamw(params: Any) -> Optimizer:
        return torch.optim.AdamW(params, lr=lr)

    methods: list[MethodResult] = []
    for name in ("AdamW", "SafeOptimizer"):
        model = task.make_model()
        plain = adamw(model.parameters())
        safe = SafeOptimizer(plain, **options) if name == "SafeOptimizer" else None
        # the two-constructor swap: SafeOptimizer and SafeLoss, which reports the loss
        loss_fn = (
            SafeLoss(nn.functional.mse_loss, optimizer=safe)
            if safe is not None
            else nn.functional.mse_loss
        )
        run = run_training(
            model, safe if safe is not None else plain, task, steps, schedule, loss_fn=loss_fn
        )
        methods.append(
            MethodResult(
                name=name,
                first_nonfinite_step=run.first_nonfinite_step,
                held_out_loss=run.held_out_loss,
                losses=run.losses,
                stats=safe.stats() if safe is not None else None,
                events=safe.events() if safe is not None else [],
                error=str(run.error) if run.error is not None else None,
            )
        )
    if monitor is not None and log_dir is not None:
        monitor.close()
        _draw(Path(log_dir))
    model = task.make_model()
    reference = run_training(model, adamw(model.parameters()), task, steps)
    return DemoResult(steps, seed, lr, schedule, methods, reference.held_out_loss)


def _draw(log_dir: Path) -> None:
    try:
        from stableopt.report import draw_report

        draw_report(log_dir / "run.jsonl", log_dir / "run.png")
    except ImportError as exc:  # matplotlib is an optional extra
        log.warning("no run.png: %s", exc)


_COLUMNS = (
    "method",
    "broken (NaN loss) since",
    "held-out loss",
    "skipped",
    "rollbacks",
    "clips",
    "emergency clips",
)
_COUNTERS = ("skipped_steps", "rollbacks", "total_clips", "emergency_clips")


def format_report(result: DemoResult) -> str:
    """The demo's plain-text report: settings, faults, one table row per method, events."""
    rows = [list(_COLUMNS)]
    for method in result.methods:
        first = "never" if method.broken_since is None else f"step {method.broken_since}"
        counters = (
            ["-"] * len(_COUNTERS)
            if method.stats is None
            else [str(method.stats[k]) for k in _COUNTERS]
        )
        rows.append([method.name, first, f"{method.held_out_loss:.4g}", *counters])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    table = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]
    table.insert(1, "  ".join("-" * width for width in widths))

    lines = [
        f"stableopt demo: MLP regression, AdamW(lr={result.lr:g}), {result.steps} steps, seed {result.seed}",
        f"faults: {result.schedule.describe()}",
        "",
        *table,
        "",
        f"fault-free reference (AdamW, no faults): held-out loss {result.reference_loss:.4g}",
    ]
    for method in result.methods:
        if method.stats is None:
            continue
        if method.error is not None:
            lines.append(f"{method.name} raised DivergenceError: {method.error}")
        lines += ["", f"{method.name} events:"]
        if not method.events:
            lines.append("  (none)")
        step_width = max((len(str(e.step)) for e in method.events), default=1)
        kind_width = max((len(e.kind) for e in method.events), default=1)
        lines += [
            f"  step {str(e.step).rjust(step_width)}  {e.kind.ljust(kind_width)}  {e.reason}"
            for e in method.events
        ]
    return "\n".join(lines)
