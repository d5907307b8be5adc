"""What the sinks share: the stable metric names and the conversion of ``stats()`` values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["COUNTER_METRICS", "METRICS", "jsonable", "metric_values", "missing_extra"]

#: Counters: a counter missing from ``stats()`` (``size_mismatches`` and
#: ``nonfinite_losses`` without a linked ``SafeLoss``) is logged as 0.
COUNTER_METRICS: tuple[str, ...] = (
    "total_clips",
    "emergency_clips",
    "lr_changes",
    "skipped_steps",
    "spike_skips",
    "rollbacks",
    "size_mismatches",
    "nonfinite_losses",
)

#: Every metric a metric sink logs, by its key in ``stats()``; the sinks log them as
#: ``stableopt/<key>``. ``loss`` is logged only when the metrics carry one.
METRICS: tuple[str, ...] = (
    "system_health",
    "emergency_mode",
    *COUNTER_METRICS,
    "grad_norm",
    "clip_threshold",
    "lr_factor",
    "loss",
)


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of :data:`METRICS` as floats, keyed by their ``stats()`` name.

    Booleans become 0/1, missing counters 0; ``None``, missing and non-finite
    values are left out (a NaN gradient norm or the infinite threshold of a clip
    policy still warming up would only wreck a plot's axis: the event of that
    step records the number).
    """
    values: dict[str, float] = {}
    for name in METRICS:
        value = metrics.get(name, 0 if name in COUNTER_METRICS else None)
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            values[name] = number
    return values


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: numbers stay numbers, a non-finite float becomes ``None``.

    JSON has no NaN or infinity (strict readers such as ``jq`` and browsers reject
    the bare ``NaN`` that :func:`json.dumps` writes by default), so a NaN or an
    infinite number is written as ``null``: "no finite value". An event's reason
    says which it was (``"gradient norm is nan"``); a clip threshold of ``inf``
    means the policy did not clip that step.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    try:  # numpy scalars, 0-dim tensors
        return jsonable(float(value))
    except (TypeError, ValueError):
        return str(value)


def missing_extra(package: str, extra: str, what: str) -> ImportError:
    """The error of a sink whose optional package is not installed."""
    return ImportError(
        f"{what} needs the {package!r} package: pip install 'stableopt[{extra}]' "
        f"(or pip install {package})"
    )
