"""A sink that writes the metrics to Python logging (the ``stableopt`` logger)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from stableopt._checks import check_int
from stableopt.monitor import Event

__all__ = ["LoggingSink"]


class LoggingSink:
    """Log one line of metrics every ``every_steps`` metric steps.

    The line reads like ``step 500: health 0.990, grad_norm 0.412 (threshold
    0.838), lr_factor 1, skipped 2 (spikes 1), rollbacks 0, clips 37 (emergency 0),
    lr_changes 4``, plus the loss when the metrics carry one. Events are not
    repeated here: the :class:`~stableopt.monitor.Monitor` already logs each one
    as a warning on the ``stableopt`` logger (rate-limited per kind).

    Args:
        level: the logging level of the lines (default ``logging.INFO``).
        logger: the logger's name (default ``"stableopt"``).
        every_steps: log only steps that are a multiple of this (default 1: every
            step on which the monitor hands out metrics, i.e. every
            ``Monitor(every_steps=...)`` steps), ``>= 1``.
    """

    def __init__(
        self, level: int = logging.INFO, logger: str = "stableopt", every_steps: int = 1
    ) -> None:
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"level must be a logging level (an int), got {level!r}")
        self.level = level
        self.logger = logging.getLogger(logger)
        self.every_steps = check_int("every_steps", every_steps, minimum=1)

    def on_event(self, event: Event) -> None:
        """Nothing: the monitor logs every event itself."""

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log one line of ``metrics`` if ``step`` is a multiple of ``every_steps``."""
        if step % self.every_steps or not self.logger.isEnabledFor(self.level):
            return
        self.logger.log(self.level, "step %d: %s", step, format_metrics(metrics))

    def close(self) -> None:
        """Nothing to release."""


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The metrics of ``stats()`` as one short line."""

    def number(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{float(value):.4g}"

    def count(key: str) -> int:
        return int(metrics.get(key) or 0)

    parts = []
    if metrics.get("loss") is not None:
        parts.append(f"loss {number('loss')}")
    parts += [
        f"health {float(metrics.get('system_health', 1.0)):.3f}",
        f"grad_norm {number('grad_norm')} (threshold {number('clip_threshold')})",
        f"lr_factor {number('lr_factor')}"
        + (" [emergency]" if metrics.get("emergency_mode") else ""),
        f"skipped {count('skipped_steps')} (spikes {count('spike_skips')})",
        f"rollbacks {count('rollbacks')}",
        f"clips {count('total_clips')} (emergency {count('emergency_clips')})",
        f"lr_changes {count('lr_changes')}",
    ]
    if count("size_mismatches"):
        parts.append(f"size_mismatches {count('size_mismatches')}")
    return ", ".join(parts)
