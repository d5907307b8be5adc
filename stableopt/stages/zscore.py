"""ZClip: clip the total gradient norm when its z-score against an EMA of past norms spikes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from stableopt._checks import check_float, check_int
from stableopt._num import Num, select
from stableopt.stages._rings import to_ring
from stableopt.stages.base import StepNumbers
from stableopt.stages.clip import HistoryClip

__all__ = ["ZScoreClip"]

#: The default eps, relative to the EMA mean of the norms (zclip's absolute 1e-6 at norm 1).
_RELATIVE_EPS = 1e-6
#: Keeps a z-score finite when every norm so far was 0.
_TINY = 1e-300


class ZScoreClip(HistoryClip):
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

    **A norm that has moved for good.** zclip feeds the EMA the *clipped* norm, so a norm
    that rises faster than the EMA follows (a norm that grows tenfold over a run, as it
    does for Adam on targets in raw units) is clipped on every step, and the EMA, fed the
    threshold, stays where it was: the policy locks in, capping the norm instead of
    clipping its spikes (measured: 97% of the steps of such a run clipped, its held-out
    loss 1.40x plain Adam's). Here, after ``rewarm_after`` clipped steps in a row the
    warm-up starts again from those steps' own norms, so the EMA takes the new level.
    ``rewarm_after=None`` is zclip's behaviour.

    The EMA lives on the host in float64 (as zclip's Python floats do), fed the
    accepted norms once each step is over. The threshold is one formula for a float
    norm and for a 0-dim tensor (a fused optimizer on an accelerator decides before
    reading anything): a comparison with ``mu + z_thresh (sigma + eps)`` and, on a
    spike, zclip's expression.

    State: 4 numbers, the ``warmup_steps`` warm-up norms and the norms of the current run
    of clipped steps.

    Args:
        alpha: EMA decay of the mean and variance (default 0.97, in (0, 1]).
        z_thresh: z-score above which a norm is a spike (default 2.5, ``> 0``).
        warmup_steps: accepted steps collected before clipping starts (default 25, ``>= 1``).
        clip_factor: multiplier of the spike threshold (default 1.0, ``> 0``; zclip
            suggests 0.5-0.9 for more aggressive clipping).
        eps: added to the standard deviation in the z-score (default ``None``: 1e-6 times
            the EMA mean, so the rule is the same whatever the size of the norms; a number:
            that absolute value, ``> 0``, zclip's own is 1e-6).
        min_norm: floor of the max norm (default ``None``: none, ``>= 0``).
        max_norm: cap of the max norm, also applied during warm-up (default ``None``:
            none, ``> 0``; zclip's own default is 1.0).
        rewarm_after: clipped steps in a row after which the warm-up restarts from their
            norms (default 16, ``>= 1``; ``None``: never, as zclip).
    """

    name = "zscore"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_factor: float = 1.0,
        eps: float | None = None,
        min_norm: float | None = None,
        max_norm: float | None = None,
        rewarm_after: int | None = 16,
    ) -> None:
        super().__init__(min_norm, max_norm)
        self.rewarm_after = (
            None if rewarm_after is None else check_int("rewarm_after", rewarm_after, minimum=1)
        )
        self.clipped_norms: list[float] = []  # the norms of the current run of clipped steps
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, inclusive_min=False)
        self.z_thresh = check_float("z_thresh", z_thresh, minimum=0.0, inclusive_min=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.clip_factor = check_float("clip_factor", clip_factor, minimum=0.0, inclusive_min=False)
        self.absolute_eps = (
            None if eps is None else check_float("eps", eps, minimum=0.0, inclusive_min=False)
        )
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

    @property
    def eps(self) -> float:
        """The ``eps`` in force: the absolute one given, else 1e-6 of the EMA mean."""
        if self.absolute_eps is not None:
            return self.absolute_eps
        return max(_RELATIVE_EPS * abs(self.mean), _TINY)

    def _spike_threshold(self, norm: Num) -> Num:
        """zclip's threshold for a spike of ``norm`` (its arithmetic, term by term)."""
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        return (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor

    def clips_above(self) -> float:
        """The norm above which the next step is clipped (``inf`` while warming up): what
        ``stats()["clip_threshold"]`` shows between clipped steps."""
        if not self.is_warm:
            return self._not_clipping()
        return float(self._bounded(self._spike_bound()))

    def max_norm(self, grad_norm: Num) -> Num:
        """The spike threshold on a spike, else ``inf``; clamped into ``[min_norm, max_norm]``."""
        if not self.is_warm:
            return self._not_clipping()
        is_spike = grad_norm > self._spike_bound()
        return self._bounded(select(is_spike, lambda: self._spike_threshold(grad_norm), math.inf))

    def observe(self, numbers: StepNumbers) -> None:
        """Collect the norm (warm-up) or update the EMA with the clipped norm (accepted steps only)."""
        norm = numbers.grad_norm
        if not numbers.is_accepted or not math.isfinite(norm):
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
        is_spike = norm > self._spike_bound()
        effective = float(self._spike_threshold(norm)) if is_spike else norm
        self.count += 1
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        if not is_spike:
            self.clipped_norms.clear()
            return
        self.clipped_norms.append(norm)
        if self.rewarm_after is not None and len(self.clipped_norms) >= self.rewarm_after:
            # not spikes any more but the norm's level: warm up again from it
            self.rebase([StepNumbers(n) for n in self.clipped_norms])

    def rebase(self, level: Sequence[StepNumbers]) -> None:
        """Start the warm-up again from ``level`` (the norms of the run's new level)."""
        self.count, self.warmup_norms, self.mean, self.var = 0, [], 0.0, 0.0
        self.clipped_norms = []
        for numbers in level:
            self.observe(dataclasses.replace(numbers, is_accepted=True))

    def _initial_history(self) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64),
            "warmup_norms": torch.zeros(self.warmup_steps, dtype=torch.float64),
            "mean": torch.zeros((), dtype=torch.float64),
            "var": torch.zeros((), dtype=torch.float64),
            "clipped_norms": torch.full((self._streak_slots,), math.nan, dtype=torch.float64),
        }

    @property
    def _streak_slots(self) -> int:
        return self.rewarm_after or 1

    def state_dict(self) -> dict[str, Any]:
        """The EMA, the warm-up norms and the current clipped run, as CPU tensors."""
        warmup = torch.zeros(self.warmup_steps, dtype=torch.float64)
        warmup[: len(self.warmup_norms)] = torch.tensor(self.warmup_norms, dtype=torch.float64)
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "warmup_norms": warmup,
            "mean": torch.tensor(self.mean, dtype=torch.float64),
            "var": torch.tensor(self.var, dtype=torch.float64),
            "clipped_norms": to_ring(
                self.clipped_norms, len(self.clipped_norms), self._streak_slots
            ),
        }

    def _load(self, state_dict: dict[str, Tensor]) -> None:
        self.count = int(state_dict["count"])
        collected = min(self.count, self.warmup_steps)
        self.warmup_norms = state_dict["warmup_norms"].double().tolist()[:collected]
        self.mean = float(state_dict["mean"])
        self.var = float(state_dict["var"])
        ring = state_dict["clipped_norms"].double()
        self.clipped_norms = [float(v) for v in ring.tolist() if math.isfinite(v)]

    def __repr__(self) -> str:
        return (
            f"ZScoreClip(alpha={self.alpha:g}, z_thresh={self.z_thresh:g}, "
            f"warmup_steps={self.warmup_steps}, clip_factor={self.clip_factor:g}, "
            f"eps={self.absolute_eps!r}, {self._bounds_repr()}, rewarm_after={self.rewarm_after!r})"
        )
