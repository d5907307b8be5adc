"""A picture of a run: ``python -m stableopt report RUN.jsonl -o run.png``.

Reads the JSON-lines run log of :class:`~stableopt.sinks.JsonlSink` and draws,
on one shared step axis:

1. the training loss (when the logged metrics carry a ``loss``; otherwise the
   panel says so);
2. the gradient norm against the clip threshold (log scale; a step line, broken
   where the policy did not clip or clipping was off), with the norms the events
   recorded (a skipped spike, a NaN drawn at the top edge) and a tick at the bottom
   for every clipped step;
3. the LR factor (emergency cuts x plateau reductions; log scale);
4. the health score;
5. an event strip: one row per kind, clipped steps included, with its count;

with a vertical marker in every panel for each skip (by its reason: non-finite, a spike, above
``skip_above``, a skip rule of yours),
rollback, emergency clip, LR cut, plateau reduction, size mismatch (SafeLoss) and
divergence, and the
recommendations of :mod:`stableopt.recommend` for the run underneath.

Needs matplotlib (``pip install 'stableopt[plot]'``); it is imported only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stableopt.monitor import Event
from stableopt.outcomes import EventKind, SkipReason, parse_cause
from stableopt.recommend import format_recommendations, recommend

__all__ = ["RunLog", "build_parser", "draw_report", "main", "read_run_log", "run", "threshold_line"]

log = logging.getLogger(__name__)

# (label, colour, line style) of each marker category, in legend order.
_MARKERS: dict[str, tuple[str, str, str]] = {
    "nonfinite_skip": ("NaN/Inf skip", "tab:orange", "-"),
    "spike_skip": ("spike skip", "gold", "-"),
    "limit_skip": ("skip_above skip", "tab:olive", "-"),
    "rule_skip": ("skip rule", "tab:cyan", "-"),
    "skip": ("skip", "tab:brown", "-"),
    "rollback": ("rollback", "tab:red", "-"),
    "emergency_clip": ("emergency clip", "tab:purple", ":"),
    "clip": ("clipped step", "tab:pink", ":"),
    "lr_cut": ("LR cut", "darkred", "--"),
    "plateau": ("plateau cut", "tab:blue", "--"),
    "size_mismatch": ("size mismatch", "tab:gray", ":"),
    "divergence": ("divergence", "black", "-"),
}


@dataclass
class RunLog:
    """What a run log holds.

    Attributes:
        metrics: the ``"metrics"`` lines in order, as written: numbers are numbers,
            ``null`` (no finite value) is ``None``. (Logs written by stableopt 0.1.0
            hold the strings ``"nan"`` and ``"inf"`` instead; :meth:`series` reads both.)
        events: the ``"event"`` lines as :class:`~stableopt.monitor.Event`; a ``null``
            in an event's data was a non-finite number and reads back as NaN.
        skipped_lines: lines that were not valid JSON (the last line of a log
            still being written, say).
    """

    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    skipped_lines: int = 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of metric ``key`` over the metric lines that have it."""
        steps, values = [], []
        for record in self.metrics:
            value = _number(record.get(key))
            if value is not None:
                steps.append(int(record["step"]))
                values.append(value)
        return steps, values

    def clipped_steps(self) -> list[int]:
        """The steps whose gradients were clipped, from the metrics' ``clipped_steps``.

        A log without them (written before they were logged) gives the metrics steps
        at which ``total_clips`` grew: each stands for one or more clips since the
        previous metrics line.
        """
        if any("clipped_steps" in record for record in self.metrics):
            return sorted(
                int(step)
                for record in self.metrics
                for step in record.get("clipped_steps") or ()
                if isinstance(step, (int, float)) and not isinstance(step, bool)
            )
        steps, previous = [], 0.0
        for record in self.metrics:
            total = _number(record.get("total_clips"))
            if total is not None and total > previous:
                steps.append(int(record["step"]))
                previous = total
        return steps


def read_run_log(path: str | Path) -> RunLog:
    """Read a JSON-lines run log (see :mod:`stableopt.sinks.jsonl`)."""
    run = RunLog()
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1
                continue
            if not isinstance(record, dict):
                run.skipped_lines += 1
            elif record.get("type") == "metrics" and "step" in record:
                run.metrics.append(record)
            elif record.get("type") == "event" and "kind" in record:
                # null in an event's data is a number that was not finite (NaN, Inf)
                data = {
                    str(k): n
                    for k, v in dict(record.get("data") or {}).items()
                    if (n := math.nan if v is None else _number(v)) is not None
                }
                labels = {str(k): str(v) for k, v in dict(record.get("labels") or {}).items()}
                run.events.append(
                    Event(
                        int(record.get("step", 0)),
                        str(record["kind"]),
                        str(record.get("reason", "")),
                        data,
                        parse_cause(record.get("cause")),
                        labels,
                    )
                )
    if run.skipped_lines:
        log.warning("%s: skipped %d line(s) that are not JSON", path, run.skipped_lines)
    return run


def draw_report(
    jsonl_path: str | Path, out_png: str | Path, *, title: str | None = None, dpi: int = 110
) -> Path:
    """Draw the run log ``jsonl_path`` into the PNG ``out_png``; return its path.

    Raises:
        ImportError: matplotlib is missing (``pip install 'stableopt[plot]'``).
        ValueError: the log holds neither metrics nor events.
    """
    figure_class = _figure_class()
    run = read_run_log(jsonl_path)
    if not run.metrics and not run.events:
        raise ValueError(
            f"{jsonl_path} holds no metrics and no events: is it a stableopt run log "
            "(JsonlSink) of a run that took at least Monitor(every_steps=...) steps?"
        )
    last = run.metrics[-1] if run.metrics else {}
    advice = recommend(_last_stats(run), run.events)
    advice_text = "\n".join(
        textwrap.fill(line, 150, subsequent_indent="    ")
        for line in format_recommendations(advice).splitlines()
    )
    advice_lines = advice_text.count("\n") + 2

    has_loss = bool(run.series("loss")[0])
    clipped = run.clipped_steps()
    categories = _categories(run.events, clipped)
    strip_height = 0.3 + 0.28 * max(1, len(categories))
    panel_heights = [2.6 if has_loss else 0.7, 2.8, 1.7, 1.4, strip_height]
    text_height = 0.16 * advice_lines
    figure = figure_class(figsize=(11, sum(panel_heights) + text_height + 1.3), dpi=dpi)
    outer = figure.add_gridspec(2, 1, height_ratios=[sum(panel_heights), text_height], hspace=0.12)
    grid = outer[0].subgridspec(5, 1, height_ratios=panel_heights, hspace=0.08)
    axes = [figure.add_subplot(grid[0])]
    axes += [figure.add_subplot(grid[i], sharex=axes[0]) for i in (1, 2, 3, 4)]
    loss_ax, norm_ax, lr_ax, health_ax, strip_ax = axes

    _draw_loss(loss_ax, run)
    _draw_grad_norm(norm_ax, run, clipped)
    _draw_series(lr_ax, run, "lr_factor", "LR factor", "tab:green", log_scale=True)
    _draw_series(health_ax, run, "system_health", "health", "tab:cyan")
    health_ax.set_ylim(-0.05, 1.05)
    _draw_markers(axes[:-1], strip_ax, categories)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
        ax.grid(True, alpha=0.3)
    strip_ax.set_xlabel("step")

    text_ax = figure.add_subplot(outer[1])
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, "Recommendations\n" + advice_text, va="top", ha="left", fontsize=8.5)
    axes[0].set_title(title or _title(jsonl_path, last, run), fontsize=11)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, bbox_inches="tight")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``stableopt report RUN.jsonl [-o RUN.png]``: draw a run log; return the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run ``report`` with arguments parsed by :func:`build_parser` (the CLI's handler)."""
    out = args.output if args.output is not None else Path(args.run_log).with_suffix(".png")
    try:
        path = draw_report(args.run_log, out, title=args.title)
    except (ImportError, ValueError, OSError) as exc:
        sys.stderr.write(f"stableopt report: {exc}\n")
        return 1
    sys.stdout.write(f"wrote {path}\n")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``report`` (added to ``parser`` if given, e.g. a subcommand's)."""
    parser = parser or argparse.ArgumentParser(
        prog="stableopt report", description="Draw a stableopt run log (JSON lines) as a PNG."
    )
    parser.add_argument("run_log", help="the run log written by JsonlSink (RUN.jsonl)")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="the PNG to write (default: RUN.png)"
    )
    parser.add_argument("--title", default=None, help="the figure's title")
    return parser


# -- panels -------------------------------------------------------------------------------


def _draw_loss(ax: Any, run: RunLog) -> None:
    steps, values = run.series("loss")
    if not steps:
        ax.text(
            0.5,
            0.5,
            "no loss in this run log (the logged metrics carry no 'loss' entry)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
        ax.set_ylabel("loss")
        ax.set_yticks([])
        return
    _draw_series(ax, run, "loss", "loss", "tab:blue", log_scale=all(v > 0 for v in values))


def _draw_grad_norm(ax: Any, run: RunLog, clipped: Sequence[int]) -> None:
    drew = _draw_series(ax, run, "grad_norm", "gradient norm", "tab:blue", log_scale=True)
    has_threshold = _draw_threshold(ax, run)
    if clipped:
        ax.scatter(
            clipped,
            [0.02] * len(clipped),
            marker="|",
            s=60,
            color=_MARKERS["clip"][1],
            zorder=3,
            transform=ax.get_xaxis_transform(),
            label=f"clipped step ({len(clipped)})",
        )
    # The norms the events saw: the spikes and NaNs that the sampled metrics miss.
    seen = [(e.step, e.data["grad_norm"]) for e in run.events if "grad_norm" in e.data]
    finite_seen = [(s, g) for s, g in seen if math.isfinite(g) and g > 0]
    if finite_seen:
        ax.scatter(
            *zip(*finite_seen), marker="v", color="tab:orange", zorder=3, s=28, label="event norm"
        )
    bad = [s for s, g in seen if not math.isfinite(g)]
    if bad:
        ax.scatter(
            bad,
            [0.97] * len(bad),
            marker="x",
            color="tab:orange",
            zorder=3,
            transform=ax.get_xaxis_transform(),
            label="NaN/Inf norm",
        )
    if drew or has_threshold or finite_seen:
        ax.set_yscale("log")
    if drew or has_threshold or finite_seen or clipped or bad:
        ax.legend(loc="upper right", fontsize=8)


def threshold_line(run: RunLog) -> tuple[list[float], list[float]]:
    """The clip threshold of the metrics lines as a step line's ``(x, y)``, broken by NaN.

    A metrics line whose threshold is ``null`` (the policy did not clip that step, or
    clipping is off), infinite or not positive has no threshold: the line breaks
    there instead of joining its neighbours. Each stretch of thresholds is drawn as
    steps (a value holds until the next metrics line of the stretch) and ends at its
    last logged step, so nothing is drawn where no threshold was logged.
    """
    xs: list[float] = []
    ys: list[float] = []
    for record in run.metrics:
        value = _number(record.get("clip_threshold"))
        step = float(record["step"])
        if value is not None and math.isfinite(value) and value > 0:
            xs.append(step)
            ys.append(value)
        elif ys and not math.isnan(ys[-1]):
            xs.append(xs[-1])  # the break sits on the stretch's last step: no segment
            ys.append(math.nan)
    return xs, ys


def _draw_threshold(ax: Any, run: RunLog) -> bool:
    xs, ys = threshold_line(run)
    if not xs:
        return False
    color = "tab:red"
    ax.plot(xs, ys, color=color, lw=1.2, ls="--", drawstyle="steps-post", label="clip threshold")
    # a stretch of one metrics line is a single point, which a line does not draw
    single = [
        (x, y)
        for i, (x, y) in enumerate(zip(xs, ys))
        if math.isfinite(y)
        and (i == 0 or math.isnan(ys[i - 1]))
        and (i + 1 == len(ys) or math.isnan(ys[i + 1]))
    ]
    if single:
        ax.scatter(*zip(*single), marker="_", s=80, color=color, linewidths=1.5, zorder=3)
    return True


def _draw_series(
    ax: Any, run: RunLog, key: str, label: str, color: str, *, log_scale: bool = False
) -> bool:
    steps, values = run.series(key)
    points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if log_scale:
        points = [(s, v) for s, v in points if v > 0]
    ax.set_ylabel(label)
    if not points:
        ax.text(0.5, 0.5, f"no {key} logged", transform=ax.transAxes, ha="center", color="0.4")
        return False
    xs, ys = zip(*points)
    ax.plot(xs, ys, color=color, lw=1.3, marker="." if len(xs) <= 60 else None, label=label)
    if log_scale:
        ax.set_yscale("log")
    return True


def _categories(events: Sequence[Event], clipped: Sequence[int] = ()) -> dict[str, list[int]]:
    """The steps of each marker category present, in the order of ``_MARKERS``."""
    steps: dict[str, list[int]] = {}
    for event in events:
        category = _category(event)
        if category is not None:
            steps.setdefault(category, []).append(event.step)
    if clipped:
        steps["clip"] = list(clipped)
    return {c: steps[c] for c in _MARKERS if c in steps}


def _draw_markers(panels: Sequence[Any], strip: Any, categories: dict[str, list[int]]) -> None:
    """A faint line per event across the panels; one row per category in the strip."""
    for row, (category, steps) in enumerate(categories.items()):
        _, color, style = _MARKERS[category]
        # clips can be most steps of a run: a row of the strip, not lines across the panels
        for ax in panels if category != "clip" else ():
            ax.vlines(
                steps,
                0,
                1,
                transform=ax.get_xaxis_transform(),
                colors=color,
                linestyles=style,
                lw=0.9,
                alpha=0.45,
                zorder=0,
            )
        strip.scatter(steps, [row] * len(steps), marker="|", s=160, color=color, linewidths=2)
    strip.set_yticks(
        range(len(categories)),
        [f"{_MARKERS[c][0]} ({len(s)})" for c, s in categories.items()],
        fontsize=8,
    )
    strip.set_ylim(len(categories) - 0.5, -0.5)
    strip.grid(True, axis="x", alpha=0.3)
    if not categories:
        strip.set_yticks([0], ["no events"], fontsize=8)
        strip.set_ylim(-0.5, 0.5)


#: The marker of a skip, by its :class:`~stableopt.outcomes.SkipReason` (a skip whose reason
#: the log does not hold, one written before it did, is a plain "skip").
_SKIP_MARKERS = {
    SkipReason.NONFINITE_GRADS: "nonfinite_skip",
    SkipReason.NONFINITE_LOSS: "nonfinite_skip",
    SkipReason.ENGINE_OVERFLOW: "nonfinite_skip",
    SkipReason.LOSS_SPIKE: "spike_skip",
    SkipReason.GRAD_NORM_SPIKE: "spike_skip",
    SkipReason.NORM_STATS_SPIKE: "spike_skip",
    SkipReason.ABOVE_SKIP_LIMIT: "limit_skip",
    SkipReason.RULE: "rule_skip",
}


def _category(event: Event) -> str | None:
    if event.kind == EventKind.SKIP:
        cause = event.cause if isinstance(event.cause, SkipReason) else None
        return _SKIP_MARKERS.get(cause, "skip") if cause is not None else "skip"
    return event.kind if event.kind in _MARKERS else None


def _title(path: str | Path, last: dict[str, Any], run: RunLog) -> str:
    if not last:
        return f"{Path(path).name}: {len(run.events)} events, no metrics"
    counts = ", ".join(
        f"{name} {int(_number(last.get(key)) or 0)}"
        for name, key in (
            ("skipped", "skipped_steps"),
            ("rollbacks", "rollbacks"),
            ("clips", "total_clips"),
            ("LR changes", "lr_changes"),
        )
    )
    health = _number(last.get("system_health"))
    health_text = f", health {health:.2f}" if health is not None else ""
    return f"{Path(path).name}: step {last['step']}, {counts}{health_text}"


def _last_stats(run: RunLog) -> dict[str, Any]:
    if not run.metrics:
        return {}
    return {k: (_number(v) if isinstance(v, str) else v) for k, v in run.metrics[-1].items()}


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _figure_class() -> Any:
    """matplotlib's ``Figure``, used without pyplot: no backend switch, no global figure state."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "the report needs matplotlib: pip install 'stableopt[plot]' (or pip install matplotlib)"
        ) from exc
    return Figure
