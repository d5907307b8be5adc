"""A window of the last accepted values of a signal, and its robust statistics (host floats).

The median and MAD are recomputed when a value is accepted (O(log n): a sorted list,
and a selection over two sorted runs), not per check, so a check is one comparison.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from torch import Tensor

from stableopt.stages._rings import from_ring, to_ring

__all__ = ["MAD_TO_STD", "RobustWindow", "lower_median_deviation"]

#: 1.4826 MAD estimates the standard deviation of normal data.
MAD_TO_STD = 1.4826


def lower_median_deviation(ordered: list[float], k: int) -> float:
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


class RobustWindow:
    """The last ``size`` accepted values (host floats) and their robust statistics.

    The median and MAD are computed once per change of the window (an accepted
    step), not per check: a check is then one comparison on the device.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[float] = deque(maxlen=size)
        self.ordered: list[float] = []  # the same values, sorted
        self.count = 0  # accepted values since the last clear (the window holds the last size)

    def median(self) -> float:
        """The lower median (``torch.nanmedian``'s); NaN while empty."""
        n = len(self.ordered)
        return self.ordered[(n - 1) // 2] if n else math.nan

    def robust(self) -> tuple[float, float, int]:
        """``(median, 1.4826 MAD, n)``: the lower median and the MAD-based standard
        deviation (NaN while empty) and how many values the window holds."""
        ordered = self.ordered
        n = len(ordered)
        if n == 0:
            return math.nan, math.nan, 0
        k = (n - 1) // 2
        return ordered[k], MAD_TO_STD * lower_median_deviation(ordered, k), n

    def append(self, x: float) -> None:
        if len(self.values) == self.size:
            del self.ordered[bisect.bisect_left(self.ordered, self.values[0])]
        self.values.append(x)
        bisect.insort(self.ordered, x)
        self.count += 1

    def discard(self, x: float) -> None:
        """Remove one value equal to ``x`` (O(size): for windows kept in step with another)."""
        self.values.remove(x)
        del self.ordered[bisect.bisect_left(self.ordered, x)]

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
