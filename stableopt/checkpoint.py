"""The ``"stableopt"`` entry of ``SafeOptimizer.state_dict()``: packing, checking, unpacking.

The entry sits beside the inner optimizer's ``state`` and ``param_groups`` and
holds every stage's own state, the monitor's counters and events, and the
classes it was saved with, so that a state dict from a different setup is
refused with a clear error instead of being loaded into the wrong objects.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stableopt.grad_norms import finite_flags
from stableopt.monitor import Monitor
from stableopt.verdict import StepVerdict

__all__ = [
    "FORMAT_VERSION",
    "STATE_KEY",
    "check_inner_state",
    "check_same_setup",
    "check_stages",
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
        if name not in saved:
            continue  # a stage newer than the state dict: it starts fresh
        here = qualname(stage) if stage is not None else None
        if saved.get(name) != here:
            raise ValueError(
                f"state_dict comes from a different setup: {name} is {saved.get(name) or 'off'} "
                f"in the state dict but {here or 'off'} here"
            )


def load_stages(ours: Mapping[str, Any], stages: Mapping[str, Any], monitor: Monitor) -> None:
    """Load every stage's state and the monitor's (after :func:`check_same_setup`)."""
    for name, stage in stages.items():
        if stage is not None and name in ours["stages"]:
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


def check_inner_state(state_dict: Mapping[str, Any], optimizer: Optimizer) -> None:
    """Raise ``ValueError`` unless the inner optimizer's part of ``state_dict`` fits
    ``optimizer``'s parameters: the same groups of the same sizes, every per-parameter state
    tensor shaped like its parameter or broadcasting to it (0-dim counters, Adafactor's
    factored row and column statistics), of a kind the parameter can hold (no complex
    state for a real parameter) and finite. Reads only; nothing is changed.
    """
    groups = state_dict["param_groups"]
    live = optimizer.param_groups
    if not isinstance(groups, (list, tuple)) or len(groups) != len(live):
        got = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
        raise ValueError(f"state_dict has {got} parameter groups; the optimizer has {len(live)}")
    params: dict[Any, tuple[int, int, Tensor]] = {}
    for g, (saved, group) in enumerate(zip(groups, live)):
        ids = saved.get("params", []) if isinstance(saved, Mapping) else []
        if len(ids) != len(group["params"]):
            raise ValueError(
                f"state_dict's parameter group {g} has {len(ids)} parameters; the "
                f"optimizer's has {len(group['params'])}"
            )
        for i, (key, param) in enumerate(zip(ids, group["params"])):
            params[key] = (g, i, param)
    per_parameter = not isinstance(optimizer, torch.optim.LBFGS)  # LBFGS keeps flat history
    numbers: list[tuple[str, str, Tensor]] = []
    for key, state in state_dict["state"].items():
        if key not in params or not isinstance(state, Mapping):
            continue
        g, i, param = params[key]
        where = f"parameter group {g} index {i} (shape {tuple(param.shape)})"
        for name, value in state.items():
            if not isinstance(value, Tensor):
                continue
            if per_parameter and not _fits(value.shape, param.shape):
                raise ValueError(
                    f"state_dict holds {name!r} of shape {tuple(value.shape)} for {where}: "
                    "a checkpoint of another model"
                )
            if value.is_complex() and not param.is_complex():
                raise ValueError(f"state_dict holds a complex {name!r} for the real {where}")
            if value.is_floating_point() or value.is_complex():
                numbers.append((where, name, value))
    if not numbers:
        return
    # one max-abs pass over every saved tensor (sharded ones reduced over the ranks)
    flags = finite_flags([value for _, _, value in numbers])
    if bool(flags.all()):
        return
    first = int((~flags).nonzero()[0])
    where, name, _ = numbers[first]
    raise ValueError(
        f"state_dict holds a non-finite {name!r} (NaN/Inf) for {where}: loading it would "
        "corrupt the optimizer"
    )


def check_stages(ours: Mapping[str, Any], stages: Mapping[str, Any], monitor: Monitor) -> None:
    """Raise what loading ``ours`` would raise, on copies: nothing of the live stages changes.

    A stage with a ``check_state_dict`` method (the rollback, whose snapshot can be as large
    as the model) checks instead of being copied.
    """
    for name, stage in stages.items():
        if stage is None or name not in ours["stages"]:
            continue  # off, or newer than the state dict (it starts fresh)
        saved = ours["stages"][name]
        check = getattr(stage, "check_state_dict", None)  # optional: the rollback's buffers
        if check is not None:
            check(saved)
        else:
            copy.deepcopy(stage).load_state_dict(saved)
    copy.deepcopy(monitor).load_state_dict(ours["monitor"])


def _fits(shape: torch.Size, param_shape: torch.Size) -> bool:
    """A state tensor of ``shape`` belongs to a parameter of ``param_shape``: it broadcasts
    to it without growing it (a layer of 8 units has no state for one of 16)."""
    try:
        return torch.broadcast_shapes(shape, param_shape) == param_shape
    except RuntimeError:
        return False
