"""History-based clip policies: ZClip (z-score of an EMA) and AutoClip (a percentile).

Both keep their history as device tensors, updated out of place with
``torch.where`` so that a skipped step never enters it and no decision needs a
host sync, and both respect an optional ``min_norm`` floor and ``max_norm`` cap.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt.clipping import ClipPolicy

__all__ = ["PercentileClip", "ZScoreClip"]

log = logging.getLogger(__name__)


class _AdaptiveClip(ClipPolicy):
    """Shared machinery of the history-based policies.

    The history is a dict of tensors, created lazily on the device (and in the
    float precision, float32 or float64) of the first norm the policy sees, and
    moved if a later norm arrives on another device (e.g. after loading a CPU
    checkpoint). Every update is out of place, so :meth:`state_dict` snapshots
    are never aliased by the next step.
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
        self._history: dict[str, Tensor] | None = None

    @abstractmethod
    def _initial_history(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """The history of a policy that has seen no step."""

    def _bounded(self, threshold: Tensor) -> Tensor:
        """Clamp ``threshold`` into ``[min_norm, max_norm]`` (``inf`` stays ``inf`` without a cap)."""
        if self.min_norm is None and self.max_norm_cap is None:
            return threshold
        return threshold.clamp(min=self.min_norm, max=self.max_norm_cap)

    def _state(self, grad_norm: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The history on ``grad_norm``'s device, and ``grad_norm`` in the history's precision."""
        device = grad_norm.device
        if self._history is None:
            dtype = torch.float64 if grad_norm.dtype == torch.float64 else torch.float32
            self._history = self._initial_history(dtype, device)
        elif self._history["count"].device != device:
            log.debug("moving the %s history to %s", type(self).__name__, device)
            self._history = {k: v.to(device) for k, v in self._history.items()}
        norm_dtype = next(v.dtype for v in self._history.values() if v.is_floating_point())
        return self._history, grad_norm.detach().to(norm_dtype)

    def state_dict(self) -> dict[str, Any]:
        """The history: tensors only (copies, on the device they live on)."""
        if self._history is None:
            return self._initial_history(torch.float32, torch.device("cpu"))
        return {k: v.clone() for k, v in self._history.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a history from :meth:`state_dict`; it moves to the gradients' device on first use.

        Raises:
            ValueError: the state dict comes from a policy with another history layout
                (e.g. another ``window_steps`` or ``warmup_steps``).
        """
        expected = self._initial_history(torch.float32, torch.device("cpu"))
        if not isinstance(state_dict, dict) or set(state_dict) != set(expected):
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
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
        self._history = {k: v.detach().clone() for k, v in state_dict.items()}

    def _bounds_repr(self) -> str:
        return f"min_norm={self.min_norm!r}, max_norm={self.max_norm_cap!r}"


class ZScoreClip(_AdaptiveClip):
    """ZClip: clip the total norm when its z-score against an EMA of past norms spikes.

    Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", 2025 (arXiv:2504.02507); the arithmetic is the authors' package ``zclip``
    (1.0, ``mode="zscore"``, ``clip_option="adaptive_scaling"``)::

        warm-up:   the first `warmup_steps` accepted norms are collected, not clipped;
                   then mu = mean(norms), var = mean((norms - mu)^2)
        each step: sigma = sqrt(var),  z = (g - mu) / (sigma + eps)
                   spike when z > z_thresh, then
                   max_norm = (mu + z_thresh * sigma / (z / z_thresh)) * clip_factor
                   (a reciprocal penalty: the larger the spike, the closer to mu)
        after:     e  = max_norm if spike else g     (the clipped norm feeds the EMA)
                   mu  <- alpha * mu  + (1 - alpha) * e
                   var <- alpha * var + (1 - alpha) * (e - mu)^2   (with the new mu)

    Without a spike (and during warm-up) the max norm is ``inf``; the result is then
    clamped into ``[min_norm, max_norm]``. The EMA is fed the unclamped value, as
    zclip feeds it before its ``max_grad_norm``. Only accepted steps with a finite
    norm enter the warm-up buffer or the EMA.

    State: 4 scalars and the ``warmup_steps`` warm-up norms, on the gradients' device.

    Args:
        alpha: EMA decay of the mean and variance (default 0.97, in (0, 1]).
        z_thresh: z-score above which a norm is a spike (default 2.5, ``> 0``).
        warmup_steps: accepted steps collected before clipping starts (default 25, ``>= 1``).
        clip_factor: multiplier of the spike threshold (default 1.0, ``> 0``; zclip
            suggests 0.5-0.9 for more aggressive clipping).
        eps: added to the standard deviation in the z-score (default 1e-6, ``> 0``).
        min_norm: floor of the max norm (default ``None``: none, ``>= 0``).
        max_norm: cap of the max norm, also applied during warm-up (default ``None``:
            none, ``> 0``; zclip's own default is 1.0).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_factor: float = 1.0,
        eps: float = 1e-6,
        min_norm: float | None = None,
        max_norm: float | None = None,
    ) -> None:
        super().__init__(min_norm, max_norm)
        self._last_spike: tuple[Tensor, Tensor, Tensor] | None = None
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, inclusive_min=False)
        self.z_thresh = check_float("z_thresh", z_thresh, minimum=0.0, inclusive_min=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.clip_factor = check_float("clip_factor", clip_factor, minimum=0.0, inclusive_min=False)
        self.eps = check_float("eps", eps, minimum=0.0, inclusive_min=False)

    def _initial_history(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "warmup_norms": torch.zeros(self.warmup_steps, dtype=dtype, device=device),
            "mean": torch.zeros((), dtype=dtype, device=device),
            "var": torch.zeros((), dtype=dtype, device=device),
        }

    def _spike(self, norm: Tensor, history: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(is_spike, zclip's threshold for a spike), from the EMA before this step."""
        mean, std = history["mean"], history["var"].sqrt()
        z = (norm - mean) / (std + self.eps)
        eta = z / self.z_thresh
        threshold = (mean + (self.z_thresh * std) / eta) * self.clip_factor
        is_ready = history["count"] >= self.warmup_steps
        return is_ready & (z > self.z_thresh), threshold

    def max_norm(self, grad_norm: Tensor) -> Tensor:
        """The spike threshold on a spike, else ``inf``; clamped into ``[min_norm, max_norm]``."""
        history, norm = self._state(grad_norm)
        is_spike, threshold = self._spike(norm, history)
        # observe() of the same step needs the same numbers: keep them, not recompute.
        self._last_spike = (grad_norm, is_spike, threshold)
        return self._bounded(torch.where(is_spike, threshold, math.inf))

    def observe(self, grad_norm: Tensor, is_accepted: Tensor) -> None:
        """Collect the norm (warm-up) or update the EMA with the clipped norm (accepted steps only)."""
        history, norm = self._state(grad_norm)
        is_accepted = is_accepted.to(norm.device) & torch.isfinite(norm)
        count = history["count"]
        is_warming_up = count < self.warmup_steps
        is_collected = is_accepted & is_warming_up
        slot = count.clamp(max=self.warmup_steps - 1).view(1)
        warmup_norms = history["warmup_norms"]
        warmup_norms = warmup_norms.scatter(
            0,
            slot,
            torch.where(is_collected, norm, warmup_norms.gather(0, slot).squeeze(0)).view(1),
        )
        new_count = count + is_accepted.to(count.dtype)
        is_initialised_now = is_collected & (new_count == self.warmup_steps)
        initial_mean = warmup_norms.mean()
        initial_var = (warmup_norms - initial_mean).square().mean()

        cached = self._last_spike
        if cached is not None and cached[0] is grad_norm:
            _, is_spike, threshold = cached
        else:
            is_spike, threshold = self._spike(norm, history)
        self._last_spike = None
        effective = torch.where(is_spike, threshold, norm)
        ema_mean = self.alpha * history["mean"] + (1 - self.alpha) * effective
        ema_var = self.alpha * history["var"] + (1 - self.alpha) * (effective - ema_mean).square()
        is_updated = is_accepted & ~is_warming_up
        self._history = {
            "count": new_count,
            "warmup_norms": warmup_norms,
            "mean": torch.where(
                is_initialised_now, initial_mean, torch.where(is_updated, ema_mean, history["mean"])
            ),
            "var": torch.where(
                is_initialised_now, initial_var, torch.where(is_updated, ema_var, history["var"])
            ),
        }

    def __repr__(self) -> str:
        return (
            f"ZScoreClip(alpha={self.alpha:g}, z_thresh={self.z_thresh:g}, "
            f"warmup_steps={self.warmup_steps}, clip_factor={self.clip_factor:g}, "
            f"eps={self.eps:g}, {self._bounds_repr()})"
        )


#: ``torch.nanquantile`` accepts at most 2**24 elements.
_MAX_WINDOW_STEPS = 2**24


class PercentileClip(_AdaptiveClip):
    """AutoClip: clip the total norm to the p-th percentile of the recent norms.

    Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks", 2020::

        history  = the last `window_steps` accepted norms, this step's norm included
        max_norm = percentile(history, p)       (numpy.percentile, linear interpolation)

    As in the authors' code, the norm is appended first and the percentile taken
    after, so the first step's threshold is its own norm (a no-op up to
    ``clip_grad_norm_``'s ``1e-6``). The result is clamped into ``[min_norm, max_norm]``.

    AutoClip keeps every norm since step 0. Here a ring buffer of ``window_steps``
    norms lives on the device (empty slots are NaN, read by ``torch.nanquantile``),
    so the cost is bounded: 1000 steps is 4 KB and one 1000-element sort per step,
    long enough for a stable 10th percentile (100 samples below it) and short
    enough to follow the norm's drift over training, which an all-time history
    cannot. A streaming quantile (P², t-digest) would need O(1) memory but is
    approximate, cannot forget, and needs data-dependent branches on the host.

    Args:
        percentile: the percentile ``p`` (default 10.0, the paper's, in [0, 100]).
        window_steps: how many accepted norms the history holds (default 1000,
            in [1, 2**24]).
        min_norm: floor of the max norm (default ``None``: none, ``>= 0``).
        max_norm: cap of the max norm (default ``None``: none, ``> 0``).
    """

    def __init__(
        self,
        percentile: float = 10.0,
        window_steps: int = 1000,
        min_norm: float | None = None,
        max_norm: float | None = None,
    ) -> None:
        super().__init__(min_norm, max_norm)
        self.percentile = check_float("percentile", percentile, minimum=0.0, maximum=100.0)
        self.window_steps = check_int("window_steps", window_steps, minimum=1)
        if self.window_steps > _MAX_WINDOW_STEPS:
            raise ValueError(
                f"window_steps must be an int in [1, {_MAX_WINDOW_STEPS}] (torch.nanquantile's "
                f"limit), got {window_steps!r}"
            )

    def _initial_history(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "norms": torch.full((self.window_steps,), math.nan, dtype=dtype, device=device),
        }

    def _with_current(self, norm: Tensor, history: dict[str, Tensor]) -> Tensor:
        """The ring buffer with this step's norm written over the oldest slot (NaN if not finite)."""
        slot = (history["count"] % self.window_steps).view(1)
        value = torch.where(torch.isfinite(norm), norm, math.nan)
        return history["norms"].scatter(0, slot, value.view(1))

    def max_norm(self, grad_norm: Tensor) -> Tensor:
        """``percentile(history + [grad_norm], p)`` clamped into ``[min_norm, max_norm]``."""
        history, norm = self._state(grad_norm)
        norms = self._with_current(norm, history)
        threshold = torch.nanquantile(norms, self.percentile / 100.0, interpolation="linear")
        # All NaN only when the first norm is not finite (a skipped step): no clipping.
        return self._bounded(torch.nan_to_num(threshold, nan=math.inf))

    def observe(self, grad_norm: Tensor, is_accepted: Tensor) -> None:
        """Append the norm to the ring buffer (accepted steps with a finite norm only)."""
        history, norm = self._state(grad_norm)
        is_accepted = is_accepted.to(norm.device) & torch.isfinite(norm)
        self._history = {
            "count": history["count"] + is_accepted.to(torch.int64),
            "norms": torch.where(is_accepted, self._with_current(norm, history), history["norms"]),
        }

    def __repr__(self) -> str:
        return (
            f"PercentileClip(percentile={self.percentile:g}, window_steps={self.window_steps}, "
            f"{self._bounds_repr()})"
        )
