"""A traced run at a hot learning rate: the loss, the LR factor and the events over time.

One task of the LR sweep at one LR, trained by plain AdamW and by SafeOptimizer defaults
with the same seed and schedule; every step's training loss, scheduled LR and effective
LR are recorded. Writes ``lr_trace.md`` (the events, and the steps around them) and, with
matplotlib, ``lr_trace.png``::

    python -m benchmarks.lr_trace --task charlm --schedule cosine --lr 3 --out results
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.lr_sweep import TASKS, train_method
from benchmarks.report_common import machine_lines, matplotlib_pyplot


@dataclass
class Trace:
    """What one method's run did, step by step (steps from 1)."""

    method: str
    initial: float = math.nan  # held-out loss before training
    final: float = math.nan  # held-out loss at the end
    losses: list[float] = field(default_factory=list)  # training loss of each step
    scheduled: list[float] = field(default_factory=list)  # the schedule's LR of each step
    effective: list[float] = field(default_factory=list)  # the LR the update used
    events: list[tuple[int, str, str]] = field(default_factory=list)


def trace(
    task_name: str, schedule: str, method: str, lr: float, seed: int = 0, steps: int | None = None
) -> Trace:
    """Train ``method`` on ``task_name`` at ``lr`` and record every step (``steps``: override
    the task's run length)."""
    record = Trace(method)

    def before_step(runner: Any, loss: Tensor) -> None:
        safe = getattr(runner, "safe", None)
        record.losses.append(float(loss.detach()))
        record.scheduled.append(float(runner.inner.param_groups[0]["lr"]))
        record.effective.append(
            float(safe.effective_lr()[0]) if safe is not None else record.scheduled[-1]
        )

    runner, outcome = train_method(task_name, schedule, method, lr, seed, steps, before_step)
    record.initial, record.final = outcome.initial, outcome.final
    safe = getattr(runner, "safe", None)
    if safe is not None:
        record.events = [(e.step, e.kind, e.reason) for e in safe.events()]
    return record


def write(
    traces: list[Trace], task: str, schedule: str, lr: float, out: Path, seconds: float
) -> list[str]:
    """Write ``lr_trace.md`` and (with matplotlib) ``lr_trace.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m benchmarks.lr_trace --task {task} --schedule {schedule} --lr {lr:g}"
    lines = [
        f"# A traced run at a hot LR: {task}, {schedule} schedule, peak LR {lr:g}",
        "",
        *machine_lines(command + f" --out {out}", seconds, 1, 1),
        "",
        "| method | held-out loss before | after |",
        "|---|---:|---:|",
        *(f"| {t.method} | {t.initial:.4f} | {t.final:.4f} |" for t in traces),
        "",
    ]
    for t in traces:
        if not t.events:
            continue
        lines += [f"## {t.method}: events", "", "| step | kind | reason |", "|---:|---|---|"]
        lines += [f"| {s} | {k} | {r} |" for s, k, r in t.events]
        marks = sorted({s for s, _, _ in t.events})
        shown = sorted(
            {s for m in marks for s in range(max(1, m - 2), m + 3)}
            | set(range(1, len(t.losses) + 1, 25))
            | set(range(1, marks[0], 4))  # the climb before the first event
        )
        lines += [
            "",
            f"## {t.method}: steps (every 25th, every 4th before the first event, those around one)",
            "",
            "| step | training loss | scheduled LR | LR factor | effective LR |",
            "|---:|---:|---:|---:|---:|",
        ]
        for s in shown:
            if s > len(t.losses):
                continue
            loss, scheduled, effective = t.losses[s - 1], t.scheduled[s - 1], t.effective[s - 1]
            factor = effective / scheduled if scheduled else math.nan
            lines.append(f"| {s} | {loss:.4g} | {scheduled:.4g} | {factor:.4g} | {effective:.4g} |")
        lines.append("")
    written = [str(out / "lr_trace.md")]
    (out / "lr_trace.md").write_text("\n".join(lines))
    pyplot: Any = matplotlib_pyplot()
    if pyplot is not None:
        fig, (top, bottom) = pyplot.subplots(2, 1, figsize=(8, 6), sharex=True)
        for t in traces:
            steps = range(1, len(t.losses) + 1)
            top.plot(steps, t.losses, label=t.method, linewidth=0.8)
            bottom.plot(steps, t.effective, label=f"{t.method} (effective)", linewidth=1.0)
            for s, kind, _ in t.events:
                if kind == "lr_cut":
                    top.axvline(s, color="red", linestyle=":", linewidth=0.8)
        top.set_yscale("log")
        top.set_ylabel("training loss")
        top.legend()
        bottom.set_yscale("log")
        bottom.set_ylabel("LR the update used")
        bottom.set_xlabel("step")
        bottom.legend()
        fig.suptitle(f"{task}, {schedule}, peak LR {lr:g}: dotted lines are LR cuts")
        fig.tight_layout()
        fig.savefig(out / "lr_trace.png", dpi=120)
        pyplot.close(fig)
        written.append(str(out / "lr_trace.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="charlm", choices=sorted(TASKS))
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--lr", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    traces = [trace(args.task, args.schedule, m, args.lr, args.seed) for m in ("adamw", "safe")]
    seconds = time.perf_counter() - started
    for path in write(traces, args.task, args.schedule, args.lr, Path(args.out), seconds):
        print(path)


if __name__ == "__main__":
    main()
