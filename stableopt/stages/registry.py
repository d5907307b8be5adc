"""What ``SafeOptimizer``'s stage arguments accept: clip policies by name, and any stage
checked by its members.

The table sits above the policies it names (it imports them; none imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from stableopt.stages.agc import AGCClip
from stableopt.stages.base import ClipPolicy
from stableopt.stages.clip import FixedClip
from stableopt.stages.percentile import PercentileClip
from stableopt.stages.zscore import ZScoreClip

__all__ = ["CLIP_POLICIES", "STAGE_MEMBERS", "resolve_clip", "resolve_stage"]

#: Policy name -> the policy built with its defaults.
CLIP_POLICIES: MappingProxyType[str, Callable[[], ClipPolicy]] = MappingProxyType(
    {
        "agc": AGCClip,
        "percentile": PercentileClip,
        "zscore": ZScoreClip,
    }
)

_ACCEPTED = (
    f"one of {sorted(CLIP_POLICIES)}, a finite positive number (a fixed max norm), a clip "
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


#: What each stage slot needs beyond the :class:`~stableopt.stages.base.Stage` members
#: (name, observe, state_dict, load_state_dict): the members the pipeline uses.
STAGE_MEMBERS: dict[str, tuple[str, ...]] = {
    "emergency_clip": ("limit", "threshold", "skip_above"),
    "escalation": ("next", "consecutive_failures", "state"),
    "spike": ("bound", "watches", "explain"),
    "emergency_lr": ("update", "triggers", "weight_fault", "factor", "min_lr", "in_emergency"),
    "hot_lr": ("update", "restart", "rebase", "is_elevated", "factor", "min_lr"),
    "plateau": ("update", "restart", "factor", "min_lr", "max_lr"),
    "rollback": ("take", "restore", "is_due", "invalidate", "has_snapshot", "snapshot_step"),
    "rerun": ("capture", "restore", "applies", "count", "by_device"),
    "ledger": ("tag", "take_tag", "is_known_bad", "record", "bad_ids"),
}


def resolve_stage(name: str, value: Any, default: Callable[[], Any]) -> Any:
    """Resolve the stage argument ``name`` of :class:`~stableopt.SafeOptimizer`:
    ``"default"`` (``default()``), ``None`` (off), or any object with the members the
    pipeline uses (:data:`STAGE_MEMBERS`; checked by member, not by class).

    Raises:
        TypeError: ``value`` is none of these; the message names the missing members.
    """
    if value is None:
        return None
    if isinstance(value, str) and value == "default":
        return default()
    members = ("name", "observe", "state_dict", "load_state_dict", *STAGE_MEMBERS[name])
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
