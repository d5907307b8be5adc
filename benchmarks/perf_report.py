"""The overhead benchmark's results as Markdown and CSV (see :mod:`benchmarks.perf`)."""

from __future__ import annotations

import csv
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

from benchmarks.perf import CLIP_MAX_NORM, METHODS, PerfResult, PerfRow, size_label

__all__ = ["format_markdown", "write_results"]

_Config = dict[str, PerfRow]  # one (size, optimizer, impl): its rows by method name

_POLICIES = [m for m in METHODS if m.group == "policy"]
# The stage table: bare X, guard only, each stage alone, the defaults.
_STAGES = [m for m in METHODS if m.group in ("baseline", "stage", "defaults") and m.name != "clip"]
_STAGES.insert(2, next(m for m in METHODS if m.name == "zscore"))


def _mib(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


def _amount(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if abs(n_bytes) >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


def _ratio(row: PerfRow) -> str:
    return f"{row.ratio:.2f} ({row.ratio_p25:.2f}-{row.ratio_p75:.2f})"


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "**missed**")


def _table(
    configs: list[_Config], header: Sequence[str], cells: Callable[[_Config], Iterable[str]]
) -> list[str]:
    """A Markdown table with one row per configuration, led by its size, X and impl."""
    lines = ["| size | X | impl | " + " | ".join(header) + " |", "|---" * (3 + len(header)) + "|"]
    for config in configs:
        row = next(iter(config.values()))
        lines.append(
            f"| {row.size} | {row.optimizer} | {row.impl} | " + " | ".join(cells(config)) + " |"
        )
    return lines


def _configs(rows: list[PerfRow]) -> list[_Config]:
    grouped: dict[tuple[str, str, str], _Config] = {}
    for row in rows:
        grouped.setdefault((row.size, row.optimizer, row.impl), {})[row.method] = row
    return list(grouped.values())


def _time_summary(title: str, selected: list[PerfRow]) -> list[str]:
    if not selected:
        return []
    missed = [r for r in selected if r.time_met is False]
    worst = max(selected, key=lambda r: r.ratio / (r.time_target or 1.0))
    best = min(selected, key=lambda r: r.ratio)
    return [
        f"- {title}: target met in {len(selected) - len(missed)} of {len(selected)} cases; "
        f"ratios {best.ratio:.2f}x ({best.size} {best.optimizer} {best.impl} {best.label}) to "
        f"{worst.ratio:.2f}x ({worst.size} {worst.optimizer} {worst.impl} {worst.label}: "
        f"{worst.median_ms:.2f} ms vs {worst.median_ms / worst.ratio:.2f} ms)."
    ]


def _memory_summary(rows: list[PerfRow]) -> list[str]:
    checked = [r for r in rows if r.method in ("guard", "defaults") or r.group == "policy"]
    missed = [r for r in checked if r.memory_met is False]
    lines = [
        f"- peak memory (guard only, defaults, each clip policy): within the limit in "
        f"{len(checked) - len(missed)} of {len(checked)} cases."
    ]
    by_method: dict[str, list[PerfRow]] = {}
    for row in missed:
        by_method.setdefault(row.label, []).append(row)
    for label, misses in by_method.items():
        worst = max(misses, key=lambda r: r.peak_bytes - (r.memory_limit or 0))
        lines.append(
            f"  - {label} over in {len(misses)} cases, at most by "
            f"{_amount(worst.peak_bytes - (worst.memory_limit or 0))} ({worst.size} "
            f"{worst.optimizer} {worst.impl}: {_amount(worst.peak_bytes)}, limit "
            f"{_amount(worst.memory_limit or 0)}; transient {_amount(worst.transient_bytes or 0)})."
        )
    return lines


def _cost_summary(configs: list[_Config]) -> list[str]:
    """Per size, what each stage adds to the guard, median over the configurations."""
    lines = []
    for size in dict.fromkeys(next(iter(c.values())).size for c in configs):
        at_size = [c for c in configs if next(iter(c.values())).size == size]

        def added(name: str, base: str, configs: list[_Config] = at_size) -> tuple[float, float]:
            extra = [c[name].median_ms - c[base].median_ms for c in configs]
            share = [(c[name].median_ms - c[base].median_ms) / c["clip"].median_ms for c in configs]
            return statistics.median(extra), statistics.median(share)

        costs = {m.label: added(m.name, "guard") for m in _STAGES if m.group != "baseline"}
        costs.pop("guard only")
        costs.pop("defaults")
        costs["agc instead of zscore"] = added("agc", "zscore")
        total, total_share = added("defaults", "clip")
        guard, guard_share = added("guard", "bare")
        ranked = sorted(costs.items(), key=lambda item: -item[1][0])
        lines.append(
            f"- {size}: defaults {total:+.2f} ms over X + clip_grad_norm_ ({total_share:+.0%}); "
            f"guard only vs bare X {guard:+.2f} ms ({guard_share:+.0%} of X + clip); each stage "
            "over guard only: "
            + ", ".join(f"{label} {ms:+.2f} ms ({share:+.0%})" for label, (ms, share) in ranked)
            + "."
        )
    return lines


def _header(result: PerfResult) -> list[str]:
    config = result.config
    rounds = ", ".join(
        f"{size_label(n)}: {config.rounds_for(n)} rounds after {config.warmup_for(n)} warm-up"
        for n in config.sizes
    )
    return [
        f"# stableopt per-step overhead ({config.device})",
        "",
        f"Command: `{result.command or 'python -m stableopt bench --perf'}`",
        "",
        *(f"- {key}: {value}" for key, value in result.machine.items()),
        f"- run time: {result.seconds / 60:.1f} min; {rounds} (a round steps every method once)",
        f"- models: {config.blocks} blocks of LayerNorm(d), Linear(d, 4d), Linear(4d, d) "
        f"({6 * config.blocks} tensors); gradients: one N(0, 1) draw scaled to a total norm of "
        f"about {CLIP_MAX_NORM:g}, times a per-step factor in [0.82, 1.22]; "
        f"clip_grad_norm_(params, {CLIP_MAX_NORM:g}); SGD(lr=1e-2, momentum=0.9), Adam(lr=1e-3), "
        "AdamW(lr=1e-3, weight_decay=0.01); forloop = foreach=False",
        "- time: the optimizer part of the step only: `opt.step()`, plus `clip_grad_norm_` for "
        "the baseline, plus `opt.observe_loss(loss)` for every SafeOptimizer variant. Methods "
        "share the model's parameters and gradients (refilled, untimed, before every step), "
        "each has its own optimizer state; every round runs them once in a shuffled order; "
        "garbage collection off. Ratio = median / median of X + clip_grad_norm_ in the same "
        "configuration; in parentheses the interquartile range of the per-round ratios.",
        f"- threads: torch.set_num_threads({config.threads}) (the default on CPU: on a shared "
        "machine, more threads than free cores stall every OpenMP kernel on a descheduled "
        "thread). More threads make the kernels faster, so the fixed per-step cost of the "
        "pipeline weighs more.",
        "- memory: tensor bytes, not process RSS: parameters + gradients + inner optimizer "
        "state + every tensor a SafeOptimizer stage holds (rollback snapshot, histories), plus "
        "the transient peak of one step (the profiler's allocation events on CPU; "
        "max_memory_allocated on CUDA).",
    ]


def format_markdown(result: PerfResult) -> str:
    """The results as Markdown: header, targets, defaults, stages, policies, memory."""
    rows = result.rows
    configs = _configs(rows)
    interventions = sum(r.interventions for r in rows)
    lines = [
        *_header(result),
        "",
        "## Targets",
        "",
        "Per step, SafeOptimizer(X) at most 1.0x X + clip_grad_norm_ for a fused X, else "
        "1.05x (the defaults, and each clip policy alone). Peak memory at most that of "
        "X + clip_grad_norm_, plus the documented snapshot (one copy of the parameters and "
        "the optimizer state) when rollback is on, plus the stages' history buffers "
        "(DESIGN.md; a few KiB, in the memory table), with 1 KiB of slack for the step's "
        "0-dim decision tensors.",
        "",
        *_time_summary("defaults, time", [r for r in rows if r.method == "defaults"]),
        *_time_summary("clip policies, time", [r for r in rows if r.group == "policy"]),
        *_memory_summary(rows),
        *(f"- note: {note}" for note in result.notes),
        f"- skipped or rolled-back steps while measuring: {interventions}"
        + (" (every timed step was a normal one)." if interventions == 0 else "."),
        "",
        "## Where the time goes",
        "",
        "Medians over the optimizers and implementations of each size; percentages are of "
        "X + clip_grad_norm_. Stages run together cost about the sum of their parts.",
        "",
        *_cost_summary(configs),
        "",
        "## Per step: SafeOptimizer(X) defaults vs X + clip_grad_norm_ (ms, medians)",
        "",
        *_table(
            configs,
            ["X", "X + clip", "defaults", "ratio (IQR)", "target", ""],
            lambda c: [
                f"{c['bare'].median_ms:.2f}",
                f"{c['clip'].median_ms:.2f}",
                f"{c['defaults'].median_ms:.2f}",
                _ratio(c["defaults"]),
                f"{c['defaults'].time_target:g}",
                _verdict(c["defaults"].time_met),
            ],
        ),
        "",
        "## The weight check: the defaults with each `check_weights` mode (ratio to X + "
        "clip_grad_norm_, IQR)",
        "",
        "`every_step` (the default) reads the updated parameters and their optimizer state after "
        "every update; `params` the parameters only; `lazy` only on a suspect step and before a "
        "snapshot (a corrupting update is undone at the next step).",
        "",
        *_table(
            configs,
            ["every_step (defaults)", "params", "lazy", "target"],
            lambda c: [
                _ratio(c["defaults"]),
                _ratio(c["defaults_params"]),
                _ratio(c["defaults_lazy"]),
                f"{c['defaults'].time_target:g}",
            ],
        ),
        "",
        "## Each stage alone: ratio to X + clip_grad_norm_",
        "",
        "`guard only`: every stage off (the non-finite skip is always on); each other column "
        "turns one stage on. The median leaves out the rollback's snapshot step (every 100 good "
        "steps): its time is in the last column, with its cost amortized over 100 steps.",
        "",
        *_table(
            configs,
            [*(m.label for m in _STAGES), "snapshot ms (per step)"],
            lambda c: [
                *(f"{c[m.name].ratio:.2f}" for m in _STAGES),
                _snapshot_cell(c),
            ],
        ),
        "",
        "## Clip policies alone (guard + policy): ratio to X + clip_grad_norm_ (IQR)",
        "",
        *_table(
            configs,
            [*(m.label for m in _POLICIES), "target"],
            lambda c: [
                *(
                    _ratio(c[m.name]) + ("" if c[m.name].time_met else " **missed**")
                    for m in _POLICIES
                ),
                f"{c['zscore'].time_target:g}",
            ],
        ),
        "",
        "## Peak memory (MiB)",
        "",
        "Persistent tensors plus the transient peak of one step (in parentheses where shown). "
        "Limit of the defaults: X + clip_grad_norm_ + snapshot + histories.",
        "",
        *_table(
            configs,
            [
                "X + clip (transient)",
                "guard only",
                "defaults (transient)",
                "snapshot",
                "histories KiB",
                "limit",
                "",
                *(f"{m.label} (transient)" for m in _POLICIES),
            ],
            lambda c: [
                _peak(c["clip"]),
                _mib(c["guard"].peak_bytes) + _over(c["guard"]),
                _peak(c["defaults"]),
                _mib(c["defaults"].snapshot_bytes),
                f"{c['defaults'].history_bytes / 1024:.1f}",
                _mib(c["defaults"].memory_limit),
                _verdict(c["defaults"].memory_met),
                *(_peak(c[m.name]) + _over(c[m.name]) for m in _POLICIES),
            ],
        ),
    ]
    if any(r.syncs_per_step is not None for r in rows):
        lines += [
            "",
            "## Blocking device syncs per step (torch.cuda.set_sync_debug_mode)",
            "",
            *_table(
                configs,
                [m.label for m in METHODS],
                lambda c: [str(c[m.name].syncs_per_step) for m in METHODS],
            ),
        ]
    return "\n".join(lines) + "\n"


def _peak(row: PerfRow) -> str:
    return f"{_mib(row.peak_bytes)} ({_mib(row.transient_bytes)})"


def _over(row: PerfRow) -> str:
    return " **over**" if row.memory_met is False else ""


def _snapshot_cell(config: _Config) -> str:
    row = config["rollback"]
    if row.snapshot_ms is None:
        return "n/a"
    return f"{row.snapshot_ms:.1f} (+{row.snapshot_ms / 100 / config['clip'].median_ms:.1%})"


def write_results(
    result: PerfResult, out_dir: str | os.PathLike[str], stem: str
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` (one row per method and configuration)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown, table = out / f"{stem}.md", out / f"{stem}.csv"
    markdown.write_text(format_markdown(result), encoding="utf-8")
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(PerfRow)])
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: _csv_value(v) for k, v in asdict(row).items()})
    return markdown, table


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
