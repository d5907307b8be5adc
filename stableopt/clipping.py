"""Gradient clip policies.

A policy decides, from the run's own history, the largest total gradient norm
allowed this step. The pipeline turns that into one clip coefficient,
``min(1, max_norm / (grad_norm + 1e-6))`` (the formula of
``torch.nn.utils.clip_grad_norm_``), which rides in the fused optimizer's
``grad_scale`` or is applied with one ``torch._foreach_mul_``.

Policies keep their history on the host, fed the norm of accepted steps from the
step's one read (a skipped step never enters it), and decide on the device from
scalars of that history, so no decision needs a host sync.

Policies, by name (``SafeOptimizer(opt, clip="zscore")``):

* ``"zscore"``: :class:`~stableopt.adaptive.ZScoreClip` (ZClip, Kumar et al. 2025);
* ``"percentile"``: :class:`~stableopt.adaptive.PercentileClip` (AutoClip, Seetharaman et al. 2020);
* ``"agc"``: :class:`~stableopt.agc.UnitwiseClip` (AGC, Brock et al. 2021);
* a number: :class:`FixedClip` (``clip_grad_norm_``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from stableopt._checks import check_float

__all__ = [
    "ClipDecision",
    "ClipPolicy",
    "FixedClip",
    "clip_coefficient",
    "decision_for",
    "resolve_clip",
]

log = logging.getLogger(__name__)

#: Added to the norm before dividing, as in ``torch.nn.utils.clip_grad_norm_``.
NORM_EPS = 1e-6


class ClipDecision(NamedTuple):
    """What a policy decided for one step (0-dim device tensors).

    Attributes:
        coefficient: factor for every gradient, in (0, 1]; ``None`` when the policy
            already clipped the gradients in place (unit-wise policies).
        threshold: the max total norm of this step (``inf`` when not clipping).
        is_clipped: whether the gradients were scaled down this step; ``None`` when
            that is ``coefficient < 1`` (the pipeline reads the coefficient and tells
            it on the host: no kernel). Set by policies that clip in place.
        is_emergency: set by :class:`~stableopt.emergency.EmergencyClip`: the norm
            was above the emergency threshold and the halved threshold applied.
        is_garbage: set by :class:`~stableopt.emergency.EmergencyClip`: the norm was
            above ``skip_above`` and the step must be skipped.
    """

    coefficient: Tensor | None
    threshold: Tensor
    is_clipped: Tensor | None = None
    is_emergency: Tensor | None = None
    is_garbage: Tensor | None = None


def clip_coefficient(max_norm: Tensor | float, grad_norm: Tensor) -> Tensor:
    """``min(1, max_norm / (grad_norm + 1e-6))`` with ``clip_grad_norm_``'s exact arithmetic."""
    return torch.clamp(max_norm / (grad_norm + NORM_EPS), max=1.0)


def decision_for(max_norm: Tensor | float, grad_norm: Tensor) -> ClipDecision:
    """The decision of a total-norm policy: ``max_norm`` and the coefficient it gives."""
    coefficient = clip_coefficient(max_norm, grad_norm)
    threshold = torch.as_tensor(max_norm, dtype=grad_norm.dtype, device=grad_norm.device)
    return ClipDecision(coefficient, threshold)


class ClipPolicy(ABC):
    """Base class of clip policies.

    Subclasses implement :meth:`max_norm` (and :meth:`observe` when they keep a
    history). State must be plain numbers and tensors, returned by
    :meth:`state_dict` and restored by :meth:`load_state_dict`, so a resumed run
    clips exactly as an uninterrupted one.
    """

    @abstractmethod
    def max_norm(self, grad_norm: Tensor | float) -> Tensor | float:
        """The largest total norm allowed this step, given this step's pre-clip norm.

        ``grad_norm`` is a 0-dim tensor (the decision stays on the device: no sync)
        or, when the gradients live on the CPU and reading a number costs nothing, a
        float; then the result must be a float.
        """

    def decide(self, grad_norm: Tensor, grads: list[Tensor], params: list[Tensor]) -> ClipDecision:
        """Turn :meth:`max_norm` into a coefficient for this step's gradients."""
        return decision_for(self.max_norm(grad_norm), grad_norm)

    @property
    def clips_in_place(self) -> bool:
        """True for a policy that scales the gradients itself in :meth:`decide`
        (no total-norm threshold, no coefficient), like the unit-wise AGC."""
        return type(self).decide is not ClipPolicy.decide

    def observe(self, grad_norm: Tensor | float, is_accepted: Tensor | bool) -> None:  # noqa: B027
        """Record this step's pre-clip norm in the history when ``is_accepted``.

        Called after the step's one host read, with host numbers: ``grad_norm`` as a
        float and ``is_accepted`` false for a step that was skipped, whose norm must
        never enter the history. (0-dim tensors are accepted too, and read.) The
        default keeps no history.
        """

    def state_dict(self) -> dict[str, Any]:
        """The policy's state: plain numbers and tensors only."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: B027
        """Restore the state returned by :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedClip(ClipPolicy):
    """Clip the total gradient norm to a fixed ``max_norm``.

    Identical to ``torch.nn.utils.clip_grad_norm_(params, max_norm)``: the
    coefficient is ``min(1, max_norm / (‖g‖₂ + 1e-6))``.

    Args:
        max_norm: the largest total L2 norm allowed, ``> 0``.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm_value = check_float("max_norm", max_norm, minimum=0.0, inclusive_min=False)

    def max_norm(self, grad_norm: Tensor | float) -> float:
        # A Python float, not a tensor: ``float / tensor`` is what clip_grad_norm_
        # computes, and only the same expression gives the same bits.
        return self.max_norm_value

    def __repr__(self) -> str:
        return f"FixedClip(max_norm={self.max_norm_value:g})"


# The policy modules import this one for ClipPolicy, so they are imported when named.
def _unitwise_clip() -> ClipPolicy:
    from stableopt.agc import UnitwiseClip

    return UnitwiseClip()


def _percentile_clip() -> ClipPolicy:
    from stableopt.adaptive import PercentileClip

    return PercentileClip()


def _zscore_clip() -> ClipPolicy:
    from stableopt.adaptive import ZScoreClip

    return ZScoreClip()


_POLICIES: dict[str, Callable[[], ClipPolicy]] = {
    "agc": _unitwise_clip,
    "percentile": _percentile_clip,
    "zscore": _zscore_clip,
}


def resolve_clip(clip: ClipPolicy | float | str | None) -> ClipPolicy | None:
    """Map the ``clip=`` argument of :class:`~stableopt.SafeOptimizer` to a policy.

    Accepts a :class:`ClipPolicy` instance, a positive number (a fixed max norm),
    the name of a policy, or ``None`` (no clipping).
    """
    if clip is None or isinstance(clip, ClipPolicy):
        return clip
    if isinstance(clip, bool):
        raise TypeError(
            f"clip must be a ClipPolicy, a positive number, a policy name or None, got {clip!r}"
        )
    if isinstance(clip, (int, float)):
        return FixedClip(float(clip))
    if isinstance(clip, str):
        if clip not in _POLICIES:
            raise ValueError(
                f"clip must be one of {sorted(_POLICIES)} (or a number, a ClipPolicy, None), got {clip!r}"
            )
        return _POLICIES[clip]()
    raise TypeError(
        "clip must be a ClipPolicy, a positive number, a policy name or None, "
        f"got {type(clip).__name__}"
    )
