"""AutoClip: clip the total gradient norm to a percentile of the recent norms."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt._num import Num, clamp, finite_or, lerp
from stableopt.stages._rings import from_ring, to_ring
from stableopt.stages.base import StepNumbers
from stableopt.stages.clip import HistoryClip

__all__ = ["PercentileClip"]

#: A cap that keeps the window's sort cheap and its state small; far above any use.
_MAX_WINDOW_STEPS = 2**24


class PercentileClip(HistoryClip):
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
    one or two clamps and a ``lerp`` with host scalars, the same formula for a float
    norm and for a 0-dim tensor. A streaming quantile (P²,
    t-digest) would need O(1) memory but is approximate and cannot forget.

    Args:
        percentile: the percentile ``p`` (default 10.0, the paper's, in [0, 100]).
        window_steps: how many accepted norms the history holds (default 1000,
            in [1, 2**24]).
        min_norm: floor of the max norm (default ``None``: none, ``>= 0``).
        max_norm: cap of the max norm (default ``None``: none, ``> 0``).
    """

    name = "percentile"

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

    def max_norm(self, grad_norm: Num) -> Num:
        """``percentile(history + [grad_norm], p)`` clamped into ``[min_norm, max_norm]``.

        A non-finite norm (a step that is skipped) gives ``inf``: no clipping.
        """
        ordered = self._ordered
        position = self.percentile / 100.0 * len(ordered)  # numpy: q * (len(history + [g]) - 1)
        k = min(math.floor(position), len(ordered))
        fraction = position - k
        threshold = _order_statistic(grad_norm, ordered, k)
        if fraction > 0:
            threshold = lerp(threshold, _order_statistic(grad_norm, ordered, k + 1), fraction)
        return self._bounded(finite_or(threshold, math.inf))

    def observe(self, numbers: StepNumbers) -> None:
        """Append the norm to the history (accepted steps with a finite norm only)."""
        norm = numbers.grad_norm
        if not numbers.is_accepted or not math.isfinite(norm):
            return
        self.count += 1
        if self._past.maxlen == 0:
            return
        if len(self._past) == self._past.maxlen:
            del self._ordered[bisect.bisect_left(self._ordered, self._past[0])]
        self._past.append(norm)
        bisect.insort(self._ordered, norm)

    def rebase(self, level: Sequence[StepNumbers]) -> None:
        """Start the history again from ``level`` (the norms of the run's new level)."""
        self.count = 0
        self._past.clear()
        self._ordered.clear()
        for numbers in level:
            self.observe(dataclasses.replace(numbers, is_accepted=True))

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


def _order_statistic(grad_norm: Num, ordered: list[float], k: int) -> Num:
    """The ``k``-th smallest (from 0) of ``ordered + [grad_norm]``: ``clamp(g, h[k-1], h[k])``
    (no sort: ``ordered`` is sorted, and ``g`` lands between its neighbours)."""
    low = ordered[k - 1] if k > 0 else None
    high = ordered[k] if k < len(ordered) else None
    return clamp(grad_norm, low, high)
