"""What ``SafeOptimizer``'s stage arguments accept: clip policies by name, and any stage
checked by its members.

The table sits above the policies it names (it imports them; none imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from stableopt.roles import (
    EmergencyClipRole,
    EmergencyLRRole,
    EscalationRole,
    HotLRRole,
    LedgerRole,
    LRPolicy,
    PlateauRole,
    RerunRole,
    RollbackRole,
    SkipRule,
    SpikeRole,
    protocol_members,
)
from stableopt.stages.agc import AGCClip
from stableopt.stages.base import ClipPolicy
from stableopt.stages.clip import FixedClip, OutlierClip
from stableopt.stages.percentile import PercentileClip
from stableopt.stages.zscore import ZScoreClip

__all__ = [
    "CLIP_POLICIES",
    "ROLES",
    "STAGE_MEMBERS",
    "resolve_clip",
    "resolve_list",
    "resolve_stage",
]

#: Policy name -> the policy built with its defaults.
CLIP_POLICIES: MappingProxyType[str, Callable[[], ClipPolicy]] = MappingProxyType(
    {
        "agc": AGCClip,
        "outlier": OutlierClip,
        "percentile": PercentileClip,
        "zscore": ZScoreClip,
    }
)

_ACCEPTED = (
    f"'auto' (the default) or one of {sorted(CLIP_POLICIES)}, a finite positive number (a fixed max norm), a clip "
    "policy (an object with name, max_norm, observe, state_dict and load_state_dict) or None"
)


def resolve_clip(clip: Any) -> ClipPolicy | None:
    """Map the ``clip=`` argument of :class:`~stableopt.SafeOptimizer` to a policy.

    Accepts any object with the members of :class:`~stableopt.stages.base.ClipPolicy`
    (checked structurally: your own class need not inherit from it), a positive
    number (:class:`~stableopt.stages.clip.FixedClip`), the name of a policy in
    :data:`CLIP_POLICIES`, or ``None`` (no clipping).

    Raises:
        TypeError: ``clip`` is none of these.
        ValueError: an unknown name, or a number that is not positive.
    """
    if clip is None:
        return None
    if isinstance(clip, bool):
        raise TypeError(f"clip must be {_ACCEPTED}; got {clip!r}")
    if isinstance(clip, (int, float)):
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be {_ACCEPTED}; got {clip!r}")
        return FixedClip(float(clip))
    if isinstance(clip, str):
        if clip not in CLIP_POLICIES:
            raise ValueError(f"clip must be {_ACCEPTED}; got the unknown name {clip!r}")
        return CLIP_POLICIES[clip]()
    if isinstance(clip, ClipPolicy):
        return clip
    missing = [
        name
        for name in ("name", "max_norm", "observe", "state_dict", "load_state_dict")
        if not hasattr(clip, name)
    ]
    raise TypeError(
        f"clip must be {_ACCEPTED}; got {type(clip).__name__}, which has no {', '.join(missing)}"
    )


#: Each stage slot's role: the protocol whose members an object must have to fill it.
ROLES: dict[str, type] = {
    "emergency_clip": EmergencyClipRole,
    "escalation": EscalationRole,
    "spike": SpikeRole,
    "emergency_lr": EmergencyLRRole,
    "hot_lr": HotLRRole,
    "plateau": PlateauRole,
    "rollback": RollbackRole,
    "rerun": RerunRole,
    "ledger": LedgerRole,
    "skip_rules": SkipRule,
    "lr_policies": LRPolicy,
}

#: What each stage slot needs (the members of its role, :data:`ROLES`).
STAGE_MEMBERS: dict[str, tuple[str, ...]] = {
    slot: protocol_members(role) for slot, role in ROLES.items()
}


def resolve_stage(name: str, value: Any, default: Callable[[], Any]) -> Any:
    """Resolve the stage argument ``name`` of :class:`~stableopt.SafeOptimizer`:
    ``"default"`` (``default()``), ``None`` (off), or any object with the members of the
    slot's role (:data:`ROLES`; checked by member, not by class).

    Raises:
        TypeError: ``value`` is none of these; the message names the missing members.
    """
    if value is None:
        return None
    if isinstance(value, str) and value == "default":
        return default()
    members = STAGE_MEMBERS[name]
    missing = [member for member in members if not hasattr(value, member)]
    if isinstance(value, str) or missing:
        what = (
            f"{value!r}"
            if isinstance(value, str)
            else f"{type(value).__name__}, which has no {', '.join(missing)}"
        )
        kind = getattr(default, "__name__", name)
        article = "an" if kind[:1] in "AEIOU" else "a"
        raise TypeError(
            f"{name} must be {article} {kind} (or an object with its members: "
            f"{', '.join(members)}), 'default' or None; got {what}"
        )
    return value


def resolve_list(name: str, values: Any) -> list[Any]:
    """Resolve a list argument of :class:`~stableopt.SafeOptimizer` (``skip_rules``,
    ``lr_policies``): a sequence (or ``None``: empty) of objects each with the members of the
    slot's role, with distinct names (events tell them apart by name).

    Raises:
        TypeError: not a sequence, or an element lacks members (named).
        ValueError: two elements share a name.
    """
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(
            f"{name} must be a list of objects with the members "
            f"{', '.join(STAGE_MEMBERS[name])}, or None; got {type(values).__name__}"
        )
    resolved = list(values)
    for i, value in enumerate(resolved):
        missing = [m for m in STAGE_MEMBERS[name] if not hasattr(value, m)]
        if missing:
            raise TypeError(
                f"{name}[{i}] must have the members {', '.join(STAGE_MEMBERS[name])}; "
                f"{type(value).__name__} has no {', '.join(missing)}"
            )
    names = [str(value.name) for value in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"{name} must have distinct names, got {names}")
    return resolved
