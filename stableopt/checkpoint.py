"""The ``"stableopt"`` entry of ``SafeOptimizer.state_dict()``: packing, checking, unpacking.

The entry sits beside the inner optimizer's ``state`` and ``param_groups`` and
holds every stage's own state, the monitor's counters and events, and the
classes it was saved with, so that a state dict from a different setup is
refused with a clear error instead of being loaded into the wrong objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer

from stableopt.monitor import Monitor
from stableopt.verdict import StepVerdict

__all__ = [
    "FORMAT_VERSION",
    "STATE_KEY",
    "check_same_setup",
    "last_verdict",
    "load_stages",
    "pack",
    "qualname",
]

STATE_KEY = "stableopt"
FORMAT_VERSION = 1


def qualname(obj: object) -> str:
    """``module.Class`` of an object: what a state dict records of each stage."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def pack(
    optimizer: Optimizer, stages: Mapping[str, Any], monitor: Monitor, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """Everything of ours, as plain data and tensors."""
    return {
        "format": FORMAT_VERSION,
        "optimizer_class": qualname(optimizer),
        "stage_classes": {k: qualname(v) if v is not None else None for k, v in stages.items()},
        "stages": {k: v.state_dict() if v is not None else None for k, v in stages.items()},
        "monitor": monitor.state_dict(),
        **extra,
    }


def check_same_setup(ours: Any, optimizer: Optimizer, stages: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``ours`` was saved by the same inner optimizer and stages."""
    if not isinstance(ours, Mapping) or ours.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"state_dict['{STATE_KEY}'] is not a stableopt state of format {FORMAT_VERSION}"
        )
    if ours.get("optimizer_class") != qualname(optimizer):
        raise ValueError(
            "state_dict comes from a different setup: optimizer_class is "
            f"{ours.get('optimizer_class')!r} in the state dict but {qualname(optimizer)!r} here"
        )
    saved = ours.get("stage_classes", {})
    for name, stage in stages.items():
        here = qualname(stage) if stage is not None else None
        if saved.get(name) != here:
            raise ValueError(
                f"state_dict comes from a different setup: {name} is {saved.get(name) or 'off'} "
                f"in the state dict but {here or 'off'} here"
            )


def load_stages(ours: Mapping[str, Any], stages: Mapping[str, Any], monitor: Monitor) -> None:
    """Load every stage's state and the monitor's (after :func:`check_same_setup`)."""
    for name, stage in stages.items():
        if stage is not None:
            stage.load_state_dict(ours["stages"][name])
    monitor.load_state_dict(ours["monitor"])


def last_verdict(ours: Mapping[str, Any], step: int) -> StepVerdict | None:
    """The numbers of the last step before the checkpoint, as ``stats()`` shows them."""
    grad_norm = ours.get("last_grad_norm")
    if grad_norm is None:
        return None
    loss, threshold = ours.get("last_loss"), ours.get("last_threshold")
    return StepVerdict(
        step=step,
        grad_norm=float(grad_norm),
        loss=None if loss is None else float(loss),
        is_accepted=True,
        skip_reason=None,
        clip_threshold=None if threshold is None else float(threshold),
    )
