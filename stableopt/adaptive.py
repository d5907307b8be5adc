"""History-based clip policies: ZClip (z-score of an EMA) and AutoClip (a percentile).

Both keep their history on the host, updated from the step's one read of the
total norm (accepted steps only, so a skipped step never enters it), and decide
on the device from scalars of that history: a comparison and a few arithmetic
kernels on the 0-dim norm, no host sync. Both respect an optional ``min_norm``
floor and ``max_norm`` cap.
"""

from __future__ import annotations

import bisect
import math
from abc import abstractmethod
from collections import deque
from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt._host import as_bool, as_float, from_ring, to_ring
from stableopt.clipping import ClipPolicy

__all__ = ["PercentileClip", "ZScoreClip"]


class _AdaptiveClip(ClipPolicy):
    """Shared machinery of the history-based policies: bounds and the state-dict checks.

    The state dict holds tensors only (CPU, float64 for norms), in the layout of
    :meth:`_initial_history`, so checkpoints load with ``weights_only=True``.
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

    def _bounded(self, threshold: Tensor) -> Tensor:
        """Clamp ``threshold`` into ``[min_norm, max_norm]`` (``inf`` stays ``inf`` without a cap)."""
        if self.min_norm is None and self.max_norm_cap is None:
            return threshold
        return threshold.clamp(min=self.min_norm, max=self.max_norm_cap)

    def _bounded_float(self, threshold: float) -> float:
        """:meth:`_bounded` for a float."""
        if self.min_norm is not None:
            threshold = max(threshold, self.min_norm)
        if self.max_norm_cap is not None:
            threshold = min(threshold, self.max_norm_cap)
        return threshold

    def _bounded_inf(self) -> float:
        """``inf`` clamped into ``[min_norm, max_norm]``: the max norm when not clipping."""
        return math.inf if self.max_norm_cap is None else self.max_norm_cap

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a history from :meth:`state_dict` (tensors on any device, any float dtype).

        Raises:
            ValueError: the state dict comes from a policy with another history layout
                (e.g. another ``window_steps`` or ``warmup_steps``).
        """
        expected = self._initial_history()
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
        self._load({k: v.detach().cpu() for k, v in state_dict.items()})

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

    The EMA lives on the host in float64 (as zclip's Python floats do). On the
    device a step costs a comparison with ``mu + z_thresh (sigma + eps)`` and, for
    the spike threshold, ``clip_factor (mu + z_thresh^2 sigma (sigma + eps) / (g - mu))``
    (the same expression, with ``z`` substituted).

    State: 4 numbers and the ``warmup_steps`` warm-up norms.

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
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, inclusive_min=False)
        self.z_thresh = check_float("z_thresh", z_thresh, minimum=0.0, inclusive_min=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.clip_factor = check_float("clip_factor", clip_factor, minimum=0.0, inclusive_min=False)
        self.eps = check_float("eps", eps, minimum=0.0, inclusive_min=False)
        self.count = 0  # accepted finite norms so far (warm-up ends at warmup_steps)
        self.warmup_norms: list[float] = []
        self.mean = 0.0
        self.var = 0.0

    @property
    def is_warm(self) -> bool:
        """True once the warm-up norms are collected and the EMA decides."""
        return self.count >= self.warmup_steps

    def _spike_bound(self) -> float:
        """The norm above which ``z > z_thresh``: ``mu + z_thresh (sigma + eps)``."""
        return self.mean + self.z_thresh * (math.sqrt(self.var) + self.eps)

    def _spike_threshold(self, norm: float) -> float:
        """zclip's threshold for a spike of ``norm`` (host arithmetic, as zclip's)."""
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        return (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor

    def max_norm(self, grad_norm: Tensor | float) -> Tensor | float:
        """The spike threshold on a spike, else ``inf``; clamped into ``[min_norm, max_norm]``.

        A float norm (the host decides: the gradients are on the CPU) gives a float.
        """
        if not self.is_warm:
            return self._bounded_inf()
        if not isinstance(grad_norm, Tensor):
            spike = grad_norm > self._spike_bound()
            return self._bounded_float(self._spike_threshold(grad_norm) if spike else math.inf)
        std = math.sqrt(self.var)
        numerator = self.clip_factor * self.z_thresh**2 * std * (std + self.eps)
        # In place on a fresh temporary: three kernels, no further allocation.
        threshold = (grad_norm - self.mean).reciprocal_().mul_(numerator)
        threshold = threshold.add_(self.clip_factor * self.mean)
        is_spike = grad_norm > self._spike_bound()
        return self._bounded(torch.where(is_spike, threshold, math.inf))

    def observe(self, grad_norm: Tensor | float, is_accepted: Tensor | bool) -> None:
        """Collect the norm (warm-up) or update the EMA with the clipped norm (accepted steps only)."""
        norm = as_float(grad_norm)
        if not as_bool(is_accepted) or not math.isfinite(norm):
            return
        if not self.is_warm:
            self.warmup_norms.append(norm)
            self.count += 1
            if self.is_warm:
                self.mean = sum(self.warmup_norms) / len(self.warmup_norms)
                self.var = sum((x - self.mean) ** 2 for x in self.warmup_norms) / len(
                    self.warmup_norms
                )
            return
        effective = self._spike_threshold(norm) if norm > self._spike_bound() else norm
        self.count += 1
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2

    def _initial_history(self) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64),
            "warmup_norms": torch.zeros(self.warmup_steps, dtype=torch.float64),
            "mean": torch.zeros((), dtype=torch.float64),
            "var": torch.zeros((), dtype=torch.float64),
        }

    def state_dict(self) -> dict[str, Any]:
        """The EMA and the warm-up norms, as CPU tensors."""
        warmup = torch.zeros(self.warmup_steps, dtype=torch.float64)
        warmup[: len(self.warmup_norms)] = torch.tensor(self.warmup_norms, dtype=torch.float64)
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "warmup_norms": warmup,
            "mean": torch.tensor(self.mean, dtype=torch.float64),
            "var": torch.tensor(self.var, dtype=torch.float64),
        }

    def _load(self, state_dict: dict[str, Tensor]) -> None:
        self.count = int(state_dict["count"])
        collected = min(self.count, self.warmup_steps)
        self.warmup_norms = state_dict["warmup_norms"].double().tolist()[:collected]
        self.mean = float(state_dict["mean"])
        self.var = float(state_dict["var"])

    def __repr__(self) -> str:
        return (
            f"ZScoreClip(alpha={self.alpha:g}, z_thresh={self.z_thresh:g}, "
            f"warmup_steps={self.warmup_steps}, clip_factor={self.clip_factor:g}, "
            f"eps={self.eps:g}, {self._bounds_repr()})"
        )


#: A cap that keeps the window's sort cheap and its state small; far above any use.
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

    AutoClip keeps every norm since step 0. Here the history is the last
    ``window_steps`` accepted norms, kept sorted on the host (1000 steps is 8 KB),
    long enough for a stable 10th percentile (100 samples below it) and short
    enough to follow the norm's drift over training, which an all-time history
    cannot. The device needs no sort: the ``k``-th smallest of the sorted past
    ``h`` and this step's ``g`` is ``clamp(g, h[k-1], h[k])``, so the percentile is
    one or two clamps and a ``lerp`` with host scalars. A streaming quantile (P²,
    t-digest) would need O(1) memory but is approximate and cannot forget.

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
                f"window_steps must be an int in [1, {_MAX_WINDOW_STEPS}], got {window_steps!r}"
            )
        self.count = 0  # accepted finite norms so far
        # The past norms this step's norm joins: the last window_steps - 1 accepted ones.
        self._past: deque[float] = deque(maxlen=self.window_steps - 1)
        self._ordered: list[float] = []  # the same, sorted

    def max_norm(self, grad_norm: Tensor | float) -> Tensor | float:
        """``percentile(history + [grad_norm], p)`` clamped into ``[min_norm, max_norm]``.

        A float norm (the host decides: the gradients are on the CPU) gives a float.
        """
        ordered = self._ordered
        n = len(ordered)
        position = self.percentile / 100.0 * n  # numpy: q * (len(history + [g]) - 1)
        k = min(math.floor(position), n)
        fraction = position - k
        if not isinstance(grad_norm, Tensor):
            if not math.isfinite(grad_norm):  # a skipped step: no clipping
                return self._bounded_float(math.inf)
            value = _order_statistic_float(grad_norm, ordered, k)
            if fraction > 0:
                above = _order_statistic_float(grad_norm, ordered, k + 1)
                value = _lerp(value, above, fraction)
            return self._bounded_float(value)
        threshold = _order_statistic(grad_norm, ordered, k) if n else grad_norm
        if fraction > 0:
            upper = _order_statistic(grad_norm, ordered, k + 1)
            threshold = torch.lerp(threshold, upper, float(fraction))
        # A non-finite norm (a skipped step): no clipping.
        return self._bounded(torch.nan_to_num(threshold, nan=math.inf, posinf=math.inf))

    def observe(self, grad_norm: Tensor | float, is_accepted: Tensor | bool) -> None:
        """Append the norm to the history (accepted steps with a finite norm only)."""
        norm = as_float(grad_norm)
        if not as_bool(is_accepted) or not math.isfinite(norm):
            return
        self.count += 1
        if self._past.maxlen == 0:
            return
        if len(self._past) == self._past.maxlen:
            del self._ordered[bisect.bisect_left(self._ordered, self._past[0])]
        self._past.append(norm)
        bisect.insort(self._ordered, norm)

    def _initial_history(self) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64),
            "norms": torch.full((self.window_steps,), math.nan, dtype=torch.float64),
        }

    def state_dict(self) -> dict[str, Any]:
        """The history as a NaN-padded ring buffer of ``window_steps`` slots, and the count.

        The ring holds the ``window_steps - 1`` norms a next step's norm joins (the
        slot the next norm will take is empty).
        """
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "norms": to_ring(list(self._past), self.count, self.window_steps),
        }

    def _load(self, state_dict: dict[str, Tensor]) -> None:
        self.count = int(state_dict["count"])
        self._past.clear()
        if self.window_steps > 1:
            self._past.extend(from_ring(state_dict["norms"], self.count, self.window_steps - 1))
        self._ordered = sorted(self._past)

    def __repr__(self) -> str:
        return (
            f"PercentileClip(percentile={self.percentile:g}, window_steps={self.window_steps}, "
            f"{self._bounds_repr()})"
        )


def _order_statistic(grad_norm: Tensor, ordered: list[float], k: int) -> Tensor:
    """The ``k``-th smallest (from 0) of ``ordered + [grad_norm]``: ``clamp(g, h[k-1], h[k])``."""
    low = ordered[k - 1] if k > 0 else None
    high = ordered[k] if k < len(ordered) else None
    return grad_norm.clamp(min=low, max=high)


def _order_statistic_float(grad_norm: float, ordered: list[float], k: int) -> float:
    """:func:`_order_statistic` on the host."""
    if k > 0:
        grad_norm = max(grad_norm, ordered[k - 1])
    if k < len(ordered):
        grad_norm = min(grad_norm, ordered[k])
    return grad_norm


def _lerp(start: float, end: float, weight: float) -> float:
    """``torch.lerp``'s (and numpy.percentile's) linear interpolation, on the host."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)
