"""Loss-spike guard: skip a step whose loss or gradient norm is an outlier against recent history.

Large-model trainers skip such steps (OLMo-core's ``SkipStepOptimizer``: a
rolling window of 128 steps, 6 standard deviations). This guard keeps the idea
and fixes what goes wrong with it:

- a skipped or non-finite value never enters the history (one NaN in a rolling
  mean/std makes both NaN for the whole window);
- the skip is a ``found_inf`` for fused optimizers or a branch before the update,
  never a multiplication of the update by 0 (NaN x 0 is NaN);
- the statistic is robust: median and MAD instead of mean and standard deviation,
  so the accepted spikes of the past do not inflate the yardstick.

Decision (per watched signal ``x``, over the last ``window_steps`` accepted values):

.. math::

    z = \\frac{x - \\operatorname{median}}{\\max(1.4826\\,\\mathrm{MAD},\\ 0.01\\,|\\operatorname{median}|)}
    \\qquad \\text{spike} \\iff z > z_{\\text{threshold}}

(1.4826 MAD estimates the standard deviation of normal data; the 1% floor keeps a
near-constant history from calling every tiny rise a spike). Only upward
outliers count. This rule acts once ``min_history`` values are in the window.

Before that (early phase: at least 3 but fewer than ``min_history`` values), a
plain ratio rule guards the first steps, where a spike would otherwise go straight
into Adam's second moment:

.. math::

    \\text{spike} \\iff \\operatorname{median} > 0 \\ \\text{and}\\ x > r\\,\\operatorname{median}

(:math:`r` is ``early_ratio``, default 100; ``None`` turns the rule off). The median is the lower
median, as everywhere here (``torch.nanmedian``'s). A non-finite value is never a
spike (it is skipped as non-finite). The windows live on the host, filled from the
step's one read; the median and MAD are recomputed when a value is accepted, and
the check is one comparison of the value with a bound on the device: no host sync.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt.stages._rings import from_ring, to_ring
from stableopt.stages.base import StepNumbers

__all__ = ["SpikeGuard"]

_MAD_TO_STD = 1.4826
_RELATIVE_FLOOR = 0.01


def _lower_median_deviation(ordered: list[float], k: int) -> float:
    """The lower median of ``|v - m|`` over sorted ``ordered``, ``m = ordered[k]`` its lower median.

    The deviations are two sorted runs, ``m - ordered[k - i]`` (left, i = 0..k) and
    ``ordered[k + 1 + j] - m`` (right); their ``k``-th smallest (from 0) is found by
    binary search over how many come from the left run: O(log n), no sort. Each
    deviation is the same float as ``abs(v - m)``.
    """
    median = ordered[k]
    n_left, n_right, take = k + 1, len(ordered) - k - 1, k + 1
    low, high = max(0, take - n_right), min(take, n_left)
    while low < high:
        i = (low + high) // 2
        j = take - i  # from the right run
        if j > 0 and median - ordered[k - i] < ordered[k + j] - median:
            low = i + 1  # left[i] is below right[j - 1]: take more from the left
        else:
            high = i
    i, j = low, take - low
    left = median - ordered[k - i + 1] if i > 0 else -math.inf
    right = ordered[k + j] - median if j > 0 else -math.inf
    return max(left, right)


class _RobustWindow:
    """The last ``size`` accepted values (host floats) and their robust statistics.

    The median and MAD are computed once per change of the window (an accepted
    step), not per check: a check is then one comparison on the device.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[float] = deque(maxlen=size)
        self.ordered: list[float] = []  # the same values, sorted
        self.count = 0  # accepted values since the last clear (the window holds the last size)

    def robust(self) -> tuple[float, float, int]:
        """``(median, scale, n)``: the (lower) median (NaN while empty), the robust
        scale ``max(1.4826 MAD, 0.01 |median|, 1e-12)`` and how many values the window holds."""
        ordered = self.ordered
        n = len(ordered)
        if n == 0:
            return math.nan, math.nan, 0
        k = (n - 1) // 2
        median = ordered[k]
        mad = _lower_median_deviation(ordered, k)
        return median, max(_MAD_TO_STD * mad, _RELATIVE_FLOOR * abs(median), 1e-12), n

    def append(self, x: float) -> None:
        if len(self.values) == self.size:
            del self.ordered[bisect.bisect_left(self.ordered, self.values[0])]
        self.values.append(x)
        bisect.insort(self.ordered, x)
        self.count += 1

    def clear(self) -> None:
        self.values.clear()
        self.ordered.clear()
        self.count = 0

    def ring(self) -> Tensor:
        """The window in the state-dict layout (a NaN-padded ring, see :func:`to_ring`)."""
        return to_ring(self.values, self.count, self.size)

    def load_ring(self, ring: Tensor | None, count: int | None) -> None:
        """Restore from :meth:`ring`'s layout (also a float32 ring from older state dicts)."""
        self.clear()
        if ring is None or count is None:
            return
        for value in from_ring(ring, count, self.size):
            self.append(value)
        self.count = count


class SpikeGuard:
    """Skip steps whose loss or total gradient norm is a robust-z outlier.

    Defaults and why: ``window_steps=128`` and ``z_threshold=6`` are OLMo-core's,
    used at scale; with a robust scale, 6 is still far in the tail (a normal
    variable exceeds it with probability 1e-9), so a healthy run essentially never
    skips. ``min_history=32`` values before the robust-z rule acts: the median and
    MAD of fewer are too noisy.

    ``early_ratio=100``: until then (from 3 values in the window on), a value more
    than 100x the median of the accepted values so far is a spike. A 100x jump over
    the median of the first few steps is not training dynamics (a falling loss
    never does it, and a gradient norm that rises in the first steps rises by a few
    x, not 100x): it is a poisoned batch or a broken gradient, and it would otherwise
    reach Adam's second moment unchecked before the robust rule is ready. Only a
    positive median is compared against (a loss that can be <= 0 is left alone).
    ``None`` turns the early rule off (nothing is skipped before ``min_history``).

    Escalation, counted over consecutive spike skips (decided by
    :class:`~stableopt.SafeOptimizer`): at ``cut_after`` (3) the emergency LR policy
    cuts the LR; at ``rollback_after`` (6) the weights go back to the last snapshot
    (taken before the run of spikes, since snapshots follow good steps only) and the
    history is cleared, so a genuine change of regime is learned afresh rather than
    skipped forever. Past that, ``max_consecutive_failures`` raises
    :class:`~stableopt.DivergenceError`.

    Args:
        window_steps: accepted values kept per signal (default 128, ``>= 8``).
        z_threshold: robust z above which a value is a spike (default 6.0, ``> 0``).
        min_history: values needed before the robust-z rule acts (default 32, in
            [3, window_steps]).
        early_ratio: before ``min_history``, from 3 values on, a value above
            ``early_ratio`` times the window's median is a spike (default 100.0,
            ``> 1``; ``None``: no early rule).
        watch_loss: test the loss (needs a loss: closure, SafeLoss or ``observe_loss``).
        watch_grad_norm: test the total gradient norm.
        cut_after: consecutive spike skips that trigger an emergency LR cut (default 3, ``>= 1``).
        rollback_after: consecutive spike skips that trigger a rollback (default 6, ``> cut_after``).
    """

    name = "spike"

    def __init__(
        self,
        window_steps: int = 128,
        z_threshold: float = 6.0,
        min_history: int = 32,
        watch_loss: bool = True,
        watch_grad_norm: bool = True,
        cut_after: int = 3,
        rollback_after: int = 6,
        early_ratio: float | None = 100.0,
    ) -> None:
        self.window_steps = check_int("window_steps", window_steps, minimum=8)
        self.z_threshold = check_float("z_threshold", z_threshold, minimum=0.0, inclusive_min=False)
        self.min_history = check_int("min_history", min_history, minimum=3)
        if self.min_history > self.window_steps:
            raise ValueError(
                f"min_history must be <= window_steps ({self.window_steps}), got {min_history}"
            )
        for name, value in (("watch_loss", watch_loss), ("watch_grad_norm", watch_grad_norm)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if not (watch_loss or watch_grad_norm):
            raise ValueError(
                "at least one of watch_loss and watch_grad_norm must be True (or pass spike=None)"
            )
        self.watch_loss = watch_loss
        self.watch_grad_norm = watch_grad_norm
        self.cut_after = check_int("cut_after", cut_after, minimum=1)
        self.rollback_after = check_int("rollback_after", rollback_after, minimum=cut_after + 1)
        self.early_ratio = (
            None
            if early_ratio is None
            else check_float("early_ratio", early_ratio, minimum=1.0, inclusive_min=False)
        )
        self._loss = _RobustWindow(self.window_steps)
        self._grad_norm = _RobustWindow(self.window_steps)

    def bound(self, signal: str) -> float | None:
        """The value above which ``signal`` (``"loss"`` or ``"grad_norm"``) is a spike now,
        or ``None`` while no rule is active (host arithmetic on the window)."""
        median, scale, n = self._window(signal).robust()
        if n >= self.min_history:
            return median + self.z_threshold * scale
        if self.early_ratio is not None and n >= 3 and median > 0:
            return self.early_ratio * median
        return None

    def observe(self, numbers: StepNumbers) -> None:
        """Append an accepted step's values to the windows (a non-finite value never enters)."""
        if not numbers.is_accepted:
            return
        for signal, value in (("loss", numbers.loss), ("grad_norm", numbers.grad_norm)):
            if value is not None and self.watches(signal) and math.isfinite(value):
                self._window(signal).append(value)

    def clear(self) -> None:
        """Forget the history (after a rollback): the guard warms up again."""
        self._loss.clear()
        self._grad_norm.clear()

    def state_dict(self) -> dict[str, Any]:
        """Both windows, as NaN-padded ring buffers (CPU float64) and counts."""
        state: dict[str, Any] = {}
        for name, window in (("loss", self._loss), ("grad_norm", self._grad_norm)):
            state[name] = window.ring() if window.count else None
            state[f"{name}_count"] = window.count if window.count else None
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, window in (("loss", self._loss), ("grad_norm", self._grad_norm)):
            count = state_dict[f"{name}_count"]
            window.load_ring(state_dict[name], None if count is None else int(count))

    def zscore(self, signal: str, value: float) -> float:
        """Robust z-score of ``value`` against ``signal``'s window now (NaN while empty)."""
        median, scale, _ = self._window(signal).robust()
        return (value - median) / scale

    def watches(self, signal: str) -> bool:
        """Whether ``signal`` (``"loss"`` or ``"grad_norm"``) is tested."""
        return self.watch_loss if signal == "loss" else self.watch_grad_norm

    def _window(self, signal: str) -> _RobustWindow:
        return self._loss if signal == "loss" else self._grad_norm

    def __repr__(self) -> str:
        return (
            f"SpikeGuard(window_steps={self.window_steps}, z_threshold={self.z_threshold:g}, "
            f"min_history={self.min_history}, early_ratio={self.early_ratio!r}, "
            f"watch_loss={self.watch_loss}, "
            f"watch_grad_norm={self.watch_grad_norm})"
        )
