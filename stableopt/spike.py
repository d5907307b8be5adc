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
median, as everywhere here (``torch.nanmedian``). A non-finite value is never a
spike (it is skipped as non-finite). Everything is device arithmetic (a NaN-padded
ring buffer and ``nanmedian``): no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float, check_int

__all__ = ["SpikeGuard"]

_MAD_TO_STD = 1.4826
_RELATIVE_FLOOR = 0.01


class _RobustWindow:
    """A NaN-padded ring buffer of accepted values with a robust z-score."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: Tensor | None = None
        self.count: Tensor | None = None

    def _ensure(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.values is None or self.count is None:
            self.values = torch.full((self.size,), float("nan"), dtype=torch.float32, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
        elif self.values.device != device:
            self.values, self.count = self.values.to(device), self.count.to(device)
        return self.values, self.count

    def zscore(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, median, n)``: the robust z-score of ``x``, the window's (lower) median
        (NaN while empty) and how many values the window holds."""
        values, count = self._ensure(x.device)
        median = torch.nanmedian(values)
        mad = torch.nanmedian((values - median).abs())
        scale = torch.maximum(_MAD_TO_STD * mad, _RELATIVE_FLOOR * median.abs()).clamp(min=1e-12)
        z = (x.to(torch.float32) - median) / scale
        return z, median, torch.clamp(count, max=self.size)

    def append(self, x: Tensor, is_accepted: Tensor) -> None:
        values, count = self._ensure(x.device)
        keep = is_accepted & torch.isfinite(x)
        position = torch.remainder(count, self.size).reshape(1)
        current = values.index_select(0, position)
        values.index_copy_(0, position, torch.where(keep, x.to(torch.float32).reshape(1), current))
        count += keep.to(torch.int64)

    def clear(self) -> None:
        if self.values is not None and self.count is not None:
            self.values.fill_(float("nan"))
            self.count.zero_()


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
        self.last_loss_z: Tensor | None = None
        self.last_grad_norm_z: Tensor | None = None

    def check(self, loss: Tensor | None, grad_norm: Tensor) -> dict[str, Tensor]:
        """Device flags ``loss_spike`` / ``grad_norm_spike`` for this step (no sync).

        A flag is true when the value is finite and either the window holds at least
        ``min_history`` values and the robust z is above ``z_threshold``, or (early
        rule) it holds 3 to ``min_history - 1`` values, their median is positive and
        the value is above ``early_ratio`` times it. The z-score is also kept in
        ``last_loss_z`` / ``last_grad_norm_z`` for the event's reason (an early spike
        has z > 66 too: for positive values the MAD is at most the median).
        """
        flags: dict[str, Tensor] = {}
        if self.watch_loss and loss is not None:
            z, median, n = self._loss.zscore(loss)
            self.last_loss_z = z
            flags["loss_spike"] = self._is_spike(loss, z, median, n)
        if self.watch_grad_norm:
            z, median, n = self._grad_norm.zscore(grad_norm)
            self.last_grad_norm_z = z
            flags["grad_norm_spike"] = self._is_spike(grad_norm, z, median, n)
        return flags

    def _is_spike(self, x: Tensor, z: Tensor, median: Tensor, n: Tensor) -> Tensor:
        is_spike = (n >= self.min_history) & (z > self.z_threshold)
        if self.early_ratio is not None:  # configuration, not a tensor value: no sync
            early = (n >= 3) & (n < self.min_history) & (median > 0)
            x32 = x.to(device=median.device, dtype=torch.float32)
            is_spike = is_spike | (early & (x32 > self.early_ratio * median))
        # A non-finite value is not a spike: the pipeline skips it as non-finite. Without
        # the isfinite term +Inf (z = +Inf) was flagged while NaN was not, so an Inf
        # gradient counted as a spike skip and fed the spike escalation (LR cut, rollback).
        return is_spike & torch.isfinite(x).to(z.device)

    def observe(self, loss: Tensor | None, grad_norm: Tensor, is_accepted: Tensor) -> None:
        """Append this step's values to the history if the step was accepted (no sync)."""
        if self.watch_loss and loss is not None:
            self._loss.append(loss, is_accepted)
        if self.watch_grad_norm:
            self._grad_norm.append(grad_norm, is_accepted)

    def clear(self) -> None:
        """Forget the history (after a rollback): the guard warms up again."""
        self._loss.clear()
        self._grad_norm.clear()

    def state_dict(self) -> dict[str, Any]:
        """Both windows, as CPU tensors."""
        state: dict[str, Any] = {}
        for name, window in (("loss", self._loss), ("grad_norm", self._grad_norm)):
            state[name] = None if window.values is None else window.values.cpu().clone()
            state[f"{name}_count"] = None if window.count is None else int(window.count)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, window in (("loss", self._loss), ("grad_norm", self._grad_norm)):
            values = state_dict[name]
            window.values = None if values is None else values.clone()
            count = state_dict[f"{name}_count"]
            window.count = None if count is None else torch.tensor(count, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"SpikeGuard(window_steps={self.window_steps}, z_threshold={self.z_threshold:g}, "
            f"min_history={self.min_history}, early_ratio={self.early_ratio!r}, "
            f"watch_loss={self.watch_loss}, "
            f"watch_grad_norm={self.watch_grad_norm})"
        )
