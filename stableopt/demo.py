"""The demo: plain AdamW and SafeOptimizer(AdamW) through the same faults.

Both train the same MLP (same seed, same data order) on a synthetic regression
task while :mod:`stableopt.testing.faults` injects, at fixed fractions of the run,
NaN gradients, an Inf loss, a 1e5x gradient spike and an update that leaves NaN
weights. :func:`run_demo` returns the numbers; :func:`format_report` turns them
into the plain-text table that ``python -m stableopt demo`` prints.
"""

from __future__ import annotations

import functools
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
from stableopt.messages import event_text
from stableopt.monitor import Event, Monitor
from stableopt.optimizer import SafeOptimizer
from stableopt.outcomes import EventKind
from stableopt.testing.faults import FaultKind, FaultSchedule, RegressionTask, run_training

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
        clips: one ``Event(step, "clip", reason, data)`` per clipped step, from the
            step's verdict (``SafeOptimizer.last_verdict``; a clip is counted in
            ``total_clips`` but is no monitor event: it can be most steps of a run);
            empty for a plain optimizer. Emergency clips are in ``events``.
        error: the message of the :class:`~stableopt.DivergenceError` that ended
            the run early, or ``None``.
    """

    name: str
    first_nonfinite_step: int | None
    held_out_loss: float
    losses: list[float]
    stats: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    clips: list[Event] = field(default_factory=list)
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
        outputs: with ``log_dir``, what was written there: a label (``"run log"``,
            ``"MLflow store"``, ``"TensorBoard log"``, ``"report"``) -> the path and how
            to open it.
        skipped_outputs: with ``log_dir``, the outputs not written: label -> why (a
            missing optional extra names its ``pip install`` command).
    """

    steps: int
    seed: int
    lr: float
    schedule: FaultSchedule
    methods: list[MethodResult]
    reference_loss: float
    outputs: dict[str, str] = field(default_factory=dict)
    skipped_outputs: dict[str, str] = field(default_factory=dict)

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
            the run log when matplotlib is installed; ``outputs`` and
            ``skipped_outputs`` of the result say what was written and what not.
    """
    check_int("steps", steps, minimum=MIN_STEPS)
    check_int("seed", seed, minimum=0)
    check_float("lr", lr, minimum=0.0, inclusive_min=False)
    schedule = demo_schedule(steps) if schedule is None else schedule
    options = dict(safe_options or {})
    monitor = None
    skipped: dict[str, str] = {}
    if log_dir is not None:
        from stableopt.sinks import default_sinks

        sinks = default_sinks(log_dir, on_skip=skipped.__setitem__)
        monitor = Monitor(sinks=sinks, every_steps=5)
        options["monitor"] = monitor
    task = RegressionTask(seed=seed)

    def adamw(params: Any) -> Optimizer:
        return torch.optim.AdamW(params, lr=lr)

    methods: list[MethodResult] = []
    for name in ("AdamW", "SafeOptimizer"):
        model = task.make_model()
        plain = adamw(model.parameters())
        safe = SafeOptimizer(plain, **options) if name == "SafeOptimizer" else None
        clips: list[Event] = []
        if safe is not None:
            safe.register_step_post_hook(functools.partial(_record_clip, clips=clips))
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
                clips=clips,
                error=str(run.error) if run.error is not None else None,
            )
        )
    outputs: dict[str, str] = {}
    skipped_outputs: dict[str, str] = {}
    if monitor is not None and log_dir is not None:
        monitor.close()
        outputs, skipped_outputs = _outputs(Path(log_dir), skipped)
    model = task.make_model()
    reference = run_training(model, adamw(model.parameters()), task, steps)
    return DemoResult(
        steps, seed, lr, schedule, methods, reference.held_out_loss, outputs, skipped_outputs
    )


def _record_clip(optimizer: SafeOptimizer, *_: Any, clips: list[Event]) -> None:
    """A step post-hook: the step's verdict as a ``clip`` line when it clipped an update."""
    verdict = optimizer.last_verdict
    if verdict is None or not (verdict.is_accepted and verdict.is_clipped):
        return
    if verdict.is_emergency or verdict.is_spike_clipped:
        return  # an emergency_clip or clip event says it already
    threshold = verdict.clip_threshold
    data = {"grad_norm": verdict.grad_norm}
    if threshold is not None and math.isfinite(threshold) and verdict.clip_coefficient < 1.0:
        data |= {"clip_threshold": threshold, "clip_coefficient": verdict.clip_coefficient}
    # else: a unit-wise policy (AGC) rescales the units over their limit in place
    reason = event_text(EventKind.CLIP, None, data, {})
    clips.append(Event(verdict.step, EventKind.CLIP.value, reason, data))


def _outputs(
    log_dir: Path, skipped_sinks: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """What the demo wrote into ``log_dir`` (and how to open it), and what it did not."""
    from stableopt.sinks import MLFLOW_DB, RUN_LOG, TENSORBOARD_DIR

    written = {"run log": str(log_dir / RUN_LOG)}
    skipped: dict[str, str] = {}
    if "MLflow" in skipped_sinks:
        skipped["MLflow store"] = skipped_sinks["MLflow"]
    else:
        store = log_dir / MLFLOW_DB
        written["MLflow store"] = (
            f"{store} (mlflow ui --backend-store-uri sqlite:///{store.resolve().as_posix()})"
        )
    if "TensorBoard" in skipped_sinks:
        skipped["TensorBoard log"] = skipped_sinks["TensorBoard"]
    else:
        events = log_dir / TENSORBOARD_DIR
        written["TensorBoard log"] = f"{events} (tensorboard --logdir {events})"
    try:
        from stableopt.report import draw_report

        png = draw_report(log_dir / RUN_LOG, log_dir / "run.png")
        written["report"] = str(png)
    except ImportError as exc:  # matplotlib is an optional extra
        skipped["report (run.png)"] = str(exc)
    return written, skipped


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
        # the clips among the events, in step order (an event first at a shared step)
        events = sorted(method.events + method.clips, key=lambda e: e.step)
        lines += ["", f"{method.name} events (step n: the n-th opt.step() call, counted from 1):"]
        if not events:
            lines.append("  (none)")
        step_width = max((len(str(e.step)) for e in events), default=1)
        kind_width = max((len(e.kind) for e in events), default=1)
        lines += [
            f"  step {str(e.step).rjust(step_width)}  {e.kind.ljust(kind_width)}  {e.reason}"
            for e in events
        ]
    if result.outputs or result.skipped_outputs:
        lines += ["", "outputs of the SafeOptimizer run:"]
        width = max(len(label) for label in (*result.outputs, *result.skipped_outputs))
        lines += [f"  {label.ljust(width)}  {where}" for label, where in result.outputs.items()]
        lines += [
            f"  {label.ljust(width)}  skipped: {why}"
            for label, why in result.skipped_outputs.items()
        ]
    return "\n".join(lines)
