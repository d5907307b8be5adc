"""The LR-sensitivity sweep's results: ``lr_sweep.md`` (tables, verdicts), ``.csv``, ``.png``.

See :mod:`benchmarks.lr_sweep` for the runs and the exact definition of the sensitivity.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from benchmarks.lr_sweep import TASKS, Curve, SweepResult, curves
from benchmarks.report_common import machine_lines, matplotlib_pyplot

__all__ = [
    "BEST_WITHIN",
    "SENSITIVITY_SHARE",
    "format_markdown",
    "plot_sweep",
    "target_verdicts",
    "write_results",
]

SENSITIVITY_SHARE = 1 / 3  # SafeOptimizer's hot-side sensitivity at most a third of AdamW's
BEST_WITHIN = 1.01  # and its loss at AdamW's best LR at most 1.01x AdamW's there


def _panels(cs: list[Curve]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((c.task, c.schedule) for c in cs))


def target_verdicts(cs: list[Curve]) -> list[tuple[str, str, str, bool, str]]:
    """``(task, schedule, target, met, detail)`` for SafeOptimizer's three targets."""
    index = {(c.task, c.schedule, c.method): c for c in cs}
    verdicts = []
    for task, schedule in _panels(cs):
        safe, plain = index.get((task, schedule, "safe")), index.get((task, schedule, "adamw"))
        if safe is None or plain is None:
            continue
        bound = plain.hot * SENSITIVITY_SHARE
        verdicts.append(
            (task, schedule, "sensitivity <= 1/3 of plain AdamW's", safe.hot <= bound,
             f"{safe.hot:.4g} vs {plain.hot:.4g} (bound {bound:.4g})")
        )  # fmt: skip
        others = [c for c in cs if (c.task, c.schedule) == (task, schedule) and c.method != "safe"]
        beaten = [c for c in others if not safe.hot < c.hot]
        detail = (
            "lower than " + ", ".join(f"{c.method} {c.hot:.4g}" for c in others)
            if not beaten
            else "not lower than " + ", ".join(f"{c.method} ({c.hot:.4g})" for c in beaten)
        )
        verdicts.append(
            (task, schedule, "sensitivity lower than every other method's", not beaten, detail)
        )
        at = plain.best_lr
        ratio = safe.losses.get(at, math.nan) / plain.losses[at]
        verdicts.append(
            (task, schedule, f"loss at plain AdamW's best LR ({at:g}) <= {BEST_WITHIN}x",
             ratio <= BEST_WITHIN, f"{safe.losses.get(at, math.nan):.4g} vs {plain.losses[at]:.4g} "
             f"(ratio {ratio:.4f})")
        )  # fmt: skip
    return verdicts


def _loss_table(cs: list[Curve], task: str, schedule: str) -> list[str]:
    mine = [c for c in cs if (c.task, c.schedule) == (task, schedule)]
    lrs = sorted({lr for c in mine for lr in c.losses})
    lines = [
        "| method | "
        + " | ".join(f"{lr:g}" for lr in lrs)
        + " | best (LR) | sensitivity, hot | full |",
        "|---|" + "---|" * (len(lrs) + 3),
    ]
    for c in mine:
        cells = []
        for lr in lrs:
            if lr not in c.losses:
                cells.append("–")
                continue
            text = f"{c.losses[lr]:.3f}"
            if c.diverged[lr]:
                text += f" ({c.diverged[lr]}/{c.seeds} div)"
            cells.append(f"**{text}**" if lr == c.best_lr else text)
        lines.append(
            f"| {c.method} | "
            + " | ".join(cells)
            + f" | {c.best:.3f} ({c.best_lr:g}) | {c.hot:.4f} | {c.full:.4f} |"
        )
    return lines


def format_markdown(result: SweepResult) -> str:
    """The report: set-up, definition, verdicts, the sensitivities, the loss per LR."""
    cs = curves(result.records)
    config = result.config
    lines = [
        "# LR-sensitivity sweep",
        "",
        *machine_lines(
            result.command or "run_sweep(...)", result.seconds, config.jobs, config.threads
        ),
        f"- seeds: {config.seeds} (0..{config.seeds - 1}); schedules: {', '.join(config.schedules)} "
        "(`cosine` = 5% linear warm-up then cosine decay to 10% of the peak; `constant` = no "
        "warm-up, constant LR)",
        *(
            f"- task `{t}`: {TASKS[t].description}; {config.steps or TASKS[t].steps} steps; LRs "
            + ", ".join(f"{lr:g}" for lr in (config.lrs or TASKS[t].lrs))
            for t in config.tasks
        ),
        "- methods: `adamw` (torch AdamW, wd 0.01); `adamw+clip` (`clip_grad_norm_(1.0)`); "
        "`zclip` (the `zclip` package, `ZClip()` defaults, as in the stability benchmark); "
        "`spam`, `stablespam` (`pytorch_optimizer.SPAM` / `StableSPAM`, package defaults, "
        "weight decay 0.01); `safe` (`SafeOptimizer(AdamW)` defaults with `SafeLoss`)",
        *(f"- **{m} not run**: {why}" for m, why in result.unavailable.items()),
        "",
        "## Definition",
        "",
        "After Wortsman et al. 2023. For method m at learning rate lr, L_m(lr) = the mean "
        "over seeds of min(final held-out loss, initial held-out loss); a diverged run "
        "(non-finite loss or `DivergenceError`) counts as its initial loss. best_m = the "
        "minimum of L_m over the whole sweep: the **per-method best**, as in the paper. The "
        "hot side H = the learning rates from **plain AdamW's best LR** upward (the same H "
        "for every method of a task and schedule). **LR sensitivity** = mean over lr in H "
        "of [L_m(lr) - best_m]; `full` is the same mean over every LR of the sweep (the "
        "paper's own range). Lower is better; 0 = the method loses nothing anywhere on the "
        "hot side.",
        "",
        "## Targets (SafeOptimizer's)",
        "",
        "| task | schedule | target | met | detail |",
        "|---|---|---|---|---|",
    ]
    verdicts = target_verdicts(cs)
    for task, schedule, target, ok, detail in verdicts:
        lines.append(f"| {task} | {schedule} | {target} | {'yes' if ok else '**NO**'} | {detail} |")
    missed = [v for v in verdicts if not v[3]]
    lines += [
        "",
        f"Met {len(verdicts) - len(missed)} of {len(verdicts)}."
        if verdicts
        else "No verdicts: `safe` or `adamw` not run.",
    ]
    methods = list(dict.fromkeys(c.method for c in cs))
    panels = _panels(cs)
    index = {(c.task, c.schedule, c.method): c for c in cs}
    lines += [
        "",
        "## LR sensitivity (hot side) per method",
        "",
        "| task | schedule | hot side from | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for task, schedule in panels:
        row = [index.get((task, schedule, m)) for m in methods]
        lowest = min((c.hot for c in row if c is not None), default=math.nan)
        cells = [
            "–" if c is None else (f"**{c.hot:.4f}**" if c.hot == lowest else f"{c.hot:.4f}")
            for c in row
        ]
        hot_from = next(c.hot_from for c in row if c is not None)
        lines.append(f"| {task} | {schedule} | {hot_from:g} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the lowest in the row."]
    better = [
        f"{task}/{schedule}: {c.method} {c.hot:.4f} < safe {index[(task, schedule, 'safe')].hot:.4f}"
        for task, schedule in panels
        for c in cs
        if (c.task, c.schedule) == (task, schedule) and c.method != "safe"
        and (task, schedule, "safe") in index and c.hot < index[(task, schedule, "safe")].hot
    ]  # fmt: skip
    if better:
        lines += ["", "**Where another method is less sensitive than SafeOptimizer:**", ""]
        lines += [f"- {b}" for b in better]
    for task, schedule in panels:
        lines += ["", f"## Final held-out loss per LR: {task}, {schedule}", ""]
        lines += [
            "Mean over seeds of min(final, initial); bold: the method's best LR; (k/n div): "
            "seeds that diverged and count as their initial loss.",
            "",
        ]
        lines += _loss_table(cs, task, schedule)
    errors = sorted(
        {(r.task, r.schedule, r.method, r.lr, r.error) for r in result.records if r.error}
    )
    if errors:
        lines += ["", "## DivergenceErrors (first 30)", ""]
        lines += [f"- {t}/{s}/{m} lr {lr:g}: {e}" for t, s, m, lr, e in errors[:30]]
    return "\n".join(lines) + "\n"


def plot_sweep(result: SweepResult, path: str | Path) -> str | None:
    """Loss against LR (log axis), one curve per method, one panel per task and schedule."""
    pyplot: Any = matplotlib_pyplot()
    if pyplot is None:
        return None
    cs = curves(result.records)
    panels = _panels(cs)
    fig, axes = pyplot.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (task, schedule) in zip(axes[0], panels):
        for c in (c for c in cs if (c.task, c.schedule) == (task, schedule)):
            lrs = sorted(c.losses)
            line = ax.plot(
                lrs, [c.losses[lr] for lr in lrs], marker="o", markersize=3, label=c.method
            )
            dead = [lr for lr in lrs if c.diverged[lr] == c.seeds]
            ax.scatter(
                dead, [c.losses[lr] for lr in dead], marker="x", color=line[0].get_color(), s=40
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{task}, {schedule}", fontsize=9)
    axes[0][0].set_ylabel("final held-out loss\n(min(final, initial); x: all seeds diverged)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return str(path)


_COLUMNS = (
    "task",
    "schedule",
    "method",
    "lr",
    "seed",
    "initial",
    "final",
    "counted",
    "diverged",
    "skipped",
    "error",
    "seconds",
)


def write_results(result: SweepResult, out: str | Path, stem: str = "lr_sweep") -> list[str]:
    """Write ``<stem>.md``, ``<stem>.csv`` and (with matplotlib) ``<stem>.png`` under ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot_sweep(result, folder / f"{stem}.png")
    body = format_markdown(result)
    if png:
        body += f"\n![final loss against learning rate]({Path(png).name})\n"
    md = folder / f"{stem}.md"
    md.write_text(body, encoding="utf-8")
    path = folder / f"{stem}.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(_COLUMNS)
        for r in result.records:
            row = [getattr(r, c) for c in _COLUMNS]
            writer.writerow(
                [
                    int(v) if isinstance(v, bool) else f"{v:.6g}" if isinstance(v, float) else v
                    for v in row
                ]
            )
    return [str(md), str(path), *([png] if png else [])]
