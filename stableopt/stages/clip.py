"""Clipping to a total norm: the coefficient, the fixed policy, and what history policies share.

A clip policy (:class:`~stableopt.stages.base.ClipPolicy`) decides the largest total
gradient norm allowed this step; the pipeline turns it into one coefficient,
``min(1, max_norm / (grad_norm + 1e-6))`` (:func:`clip_coefficient`, the arithmetic of
``torch.nn.utils.clip_grad_norm_``), applied with one ``torch._foreach_mul_`` or
carried in a fused optimizer's ``grad_scale``.

The policies, by name (``SafeOptimizer(opt, clip="zscore")``; the table is
:mod:`stableopt.registry`):

* ``"zscore"``: :class:`~stableopt.stages.zscore.ZScoreClip` (ZClip, Kumar et al. 2025);
* ``"percentile"``: :class:`~stableopt.stages.percentile.PercentileClip` (AutoClip,
  Seetharaman et al. 2020);
* ``"agc"``: :class:`~stableopt.stages.agc.AGCClip` (AGC, Brock et al. 2021);
* ``"outlier"``: :class:`OutlierClip` (only outliers: the spike guard's bound and the
  emergency clip);
* a number: :class:`FixedClip` (``clip_grad_norm_``).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float
from stableopt._num import Num, clamp
from stableopt.stages.base import ClipPolicy

__all__ = ["NORM_EPS", "FixedClip", "HistoryClip", "OutlierClip", "clip_coefficient"]

#: Added to the norm before dividing, as in ``torch.nn.utils.clip_grad_norm_``.
NORM_EPS = 1e-6


def clip_coefficient(max_norm: Num, grad_norm: Tensor) -> Tensor:
    """``min(1, max_norm / (grad_norm + 1e-6))`` with ``clip_grad_norm_``'s exact arithmetic."""
    return torch.clamp(max_norm / (grad_norm + NORM_EPS), max=1.0)


class FixedClip(ClipPolicy):
    """Clip the total gradient norm to a fixed ``max_norm``.

    Identical to ``torch.nn.utils.clip_grad_norm_(params, max_norm)``: the
    coefficient is ``min(1, max_norm / (‖g‖₂ + 1e-6))``.

    Args:
        max_norm: the largest total L2 norm allowed, ``> 0``.
    """

    name = "fixed"

    def __init__(self, max_norm: float) -> None:
        self.max_norm_value = check_float("max_norm", max_norm, minimum=0.0, inclusive_min=False)

    def max_norm(self, grad_norm: Num) -> float:
        # A Python float, not a tensor: ``float / tensor`` is what clip_grad_norm_
        # computes, and only the same expression gives the same bits.
        return self.max_norm_value

    def __repr__(self) -> str:
        return f"FixedClip(max_norm={self.max_norm_value:g})"


class OutlierClip(ClipPolicy):
    """Clip only a gradient norm that is an outlier of the run: above the spike guard's bound
    (its local level plus ``z_threshold`` units of its step-to-step noise, on a log scale:
    :class:`~stableopt.stages.spike.SpikeGuard`) or above the emergency threshold (10x the
    median of the recent norms: :class:`~stableopt.stages.emergency_clip.EmergencyClip`).

    The policy itself sets no limit (``max_norm`` is ``inf``): an ordinary step of a healthy
    run, however its norms are distributed (BatchNorm with SGD, batches of one, a user's
    own ``clip_grad_norm_`` pinning them at a ceiling), is never scaled down. With
    ``spike=None`` and ``emergency_clip=None`` it never clips.
    """

    name = "outlier"

    def max_norm(self, grad_norm: Num) -> float:
        return math.inf

    def __repr__(self) -> str:
        return "OutlierClip()"


class HistoryClip(ClipPolicy):
    """What the history-based policies share: ``min_norm``/``max_norm`` bounds and a
    state dict of CPU tensors (norms in float64) whose layout is checked on load, so a
    checkpoint loads with ``weights_only=True`` and a history of another length is refused.
    """

    def __init__(self, min_norm: float | None, max_norm: float | None) -> None:
        if min_norm is not None:
            min_norm = check_float("min_norm", min_norm, minimum=0.0)
        if max_norm is not None:
            max_norm = check_float("max_norm", max_norm, minimum=0.0, inclusive_min=False)
        if min_norm is not None and max_norm is not None and min_norm > max_norm:
            raise ValueError(
                f"min_norm must be <= max_norm, got min_norm={min_norm!r} > max_norm={max_norm!r}"
            )
        self.min_norm = min_norm
        self.max_norm_cap = max_norm

    @abstractmethod
    def _initial_history(self) -> dict[str, Tensor]:
        """The state dict of a policy that has seen no step (fixes the keys and shapes)."""

    @abstractmethod
    def _load(self, state_dict: dict[str, Tensor]) -> None:
        """Restore the history from a validated state dict."""

    def _bounded(self, threshold: Num) -> Num:
        """``threshold`` clamped into ``[min_norm, max_norm]`` (``inf`` stays ``inf`` without a cap)."""
        return clamp(threshold, self.min_norm, self.max_norm_cap)

    def _not_clipping(self) -> float:
        """The max norm of a step the policy does not clip: ``inf``, or the cap."""
        return math.inf if self.max_norm_cap is None else self.max_norm_cap

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a history from :meth:`state_dict` (tensors on any device, any float dtype).

        Raises:
            ValueError: the state dict comes from a policy with another history layout
                (e.g. another ``window_steps`` or ``warmup_steps``).
        """
        expected = self._initial_history()
        if not isinstance(state_dict, Mapping) or set(state_dict) != set(expected):
            got = (
                sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            )
            raise ValueError(
                f"state_dict of {type(self).__name__} must have the keys {sorted(expected)}, got {got}"
            )
        for key, value in state_dict.items():
            if not isinstance(value, Tensor) or value.shape != expected[key].shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict[{key!r}] of {type(self).__name__} must be a tensor of shape "
                    f"{tuple(expected[key].shape)} (this policy's settings), got {shape}"
                )
        self._load({k: v.detach().cpu() for k, v in state_dict.items()})

    def _bounds_repr(self) -> str:
        return f"min_norm={self.min_norm!r}, max_norm={self.max_norm_cap!r}"
