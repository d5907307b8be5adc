"""The gate: a step's gradient norm and loss in, its verdict (skip? clip how much?) out.

One set of formulas, two ways to run them (:mod:`stableopt._num`):

* **Read, then decide** (:meth:`Gate.decide`): the norm and the loss are read to the
  host first and everything is decided in Python floats. On the CPU reading a number
  is not a sync; on an accelerator the update of a non-fused optimizer must wait for
  the verdict anyway, so this is the step's one blocking read. The clip coefficient
  is computed with ``clip_grad_norm_``'s expression on the norm tensor, only on a
  step that clips: a healthy step pays one norm pass and no multiply.
* **Decide on the device** (:meth:`Gate.decide_on_device`): a fused inner optimizer
  on an accelerator takes the skip in ``found_inf`` and the coefficient in
  ``grad_scale``, so the update is queued before anything is read. The same formulas
  run on 0-dim tensors (a handful of kernels, no sync) and :meth:`Gate.read` brings
  the numbers to the host once, after the update.

Either way a skip is a comparison of each number with the bounds the host holds (the
spike guard's, ``skip_above``; the dtype's largest finite value without one). The
bounds are rounded to the number's dtype, the precision a kernel compares in, so
the host tells which bound was crossed from the numbers it reads, exactly, and both
ways give the same verdict.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from stableopt._num import Num, clamp, is_within, where
from stableopt.grad_norms import GradStats, read_host
from stableopt.outcomes import SkipReason
from stableopt.roles import EmergencyClipRole, SkipRule, SpikeRole
from stableopt.stages.base import ClipPolicy
from stableopt.stages.clip import NORM_EPS, clip_coefficient
from stableopt.verdict import StepVerdict

__all__ = ["Bound", "Gate", "PendingVerdict"]

#: Read-then-decide computes the coefficient on the tensor (3 kernels) when the max norm
#: is within this relative margin of the norm: float32 rounding decides at the boundary.
_CLIP_MARGIN = 1e-5


class Bound(NamedTuple):
    """A value above which ``signal`` (``"grad_norm"`` or ``"loss"``) trips ``name``
    (``clip_to``: what a norm above it is clipped to, for a bound that clips)."""

    name: str
    signal: str
    value: float
    clip_to: float | None = None


#: The spike guard's bound of the gradient norm when a clip policy is on: a clip limit.
_SPIKE_CLIP = "grad_norm_spike_clip"

#: The prefix of a skip rule's bound name (``"rule:<name>"``).
_RULE = "rule:"

#: The bounds that skip a step, and the reason each gives, in the order reasons are told
#: (a skip rule's bounds last: :data:`_RULE`).
_SKIPS = {
    "above_skip_limit": SkipReason.ABOVE_SKIP_LIMIT,
    "loss_spike": SkipReason.LOSS_SPIKE,
    "grad_norm_spike": SkipReason.GRAD_NORM_SPIKE,
    "norm_stats_spike": SkipReason.NORM_STATS_SPIKE,
}


class PendingVerdict(NamedTuple):
    """A verdict decided on the device, not yet read: 0-dim tensors and the bounds used."""

    bounds: tuple[Bound, ...]
    is_ok: Tensor
    coefficient: Tensor | None
    flags: dict[str, Tensor]
    numbers: dict[str, Tensor]
    clip_threshold: float | None  # when the policy's max norm is a host number


class Gate:
    """Turn a step's gradient norm and loss into a :class:`~stableopt.verdict.StepVerdict`.

    Holds no state of its own: it reads the clip policy, the emergency clip, the spike
    guard (any of them ``None``) and the skip rules it is given.
    """

    def __init__(
        self,
        clip: ClipPolicy | None,
        emergency_clip: EmergencyClipRole | None,
        spike: SpikeRole | None,
        rules: Sequence[SkipRule] = (),
    ) -> None:
        self.clip = clip
        self.emergency_clip = emergency_clip if clip is not None else None
        self.spike = spike
        self.rules = list(rules)

    # -- the formulas, for floats and 0-dim tensors alike --------------------------------

    def bounds(
        self,
        norm_dtype: torch.dtype,
        loss_dtype: torch.dtype | None,
        norm_stats: bool = False,
    ) -> tuple[Bound, ...]:
        """This step's bounds, each rounded to the dtype of the number it bounds
        (``norm_stats``: the step measured its running statistics' growth)."""
        bounds: list[Bound] = []
        dtypes = {"grad_norm": norm_dtype, "loss": loss_dtype}
        if self.spike is not None:
            for signal in ("grad_norm", "loss"):
                dtype = dtypes[signal]
                bound = self.spike.bound(signal) if self.spike.watches(signal) else None
                if bound is None or dtype is None:
                    continue
                if signal == "grad_norm" and self.clip is not None:
                    # with a clip policy on, a gradient-norm spike (the loss was ordinary)
                    # is clipped back to the norm's level instead of skipped: an ordinary
                    # step in its direction
                    level = self.spike.level(signal)
                    bounds.append(Bound(_SPIKE_CLIP, signal, _rounded(bound, dtype), level))
                    # far above its level, the norm is no noisy batch but a broken one:
                    # skipped
                    far = self.spike.skip_bound(signal)
                    if far is not None and math.isfinite(far):
                        bounds.append(Bound(f"{signal}_spike", signal, _rounded(far, dtype)))
                else:
                    bounds.append(Bound(f"{signal}_spike", signal, _rounded(bound, dtype)))
            if norm_stats:  # the growth is measured against its own bound: 1
                bounds.append(Bound("norm_stats_spike", "norm_stats", 1.0))
        for rule in self.rules:
            for signal in ("grad_norm", "loss"):
                dtype = dtypes[signal]
                bound = rule.bound(signal)
                if bound is not None and dtype is not None:
                    name = f"{_RULE}{rule.name}"
                    bounds.append(Bound(name, signal, _rounded(float(bound), dtype)))
        if self.emergency_clip is not None:
            skip_above = self.emergency_clip.skip_above
            if skip_above is not None:
                bounds.append(
                    Bound("above_skip_limit", "grad_norm", _rounded(skip_above, norm_dtype))
                )
            threshold = self.emergency_clip.threshold
            if threshold is not None:
                rounded = _rounded(threshold, norm_dtype)
                bounds.append(Bound("emergency_clip", "grad_norm", rounded))
        return tuple(bounds)

    @staticmethod
    def passes(
        grad_norm: Num,
        loss: Num | None,
        bounds: Sequence[Bound],
        norm_dtype: torch.dtype,
        loss_dtype: torch.dtype | None,
        norm_stats: Num | None = None,
    ) -> Tensor | bool:
        """May the update run: a finite norm and loss, at most every skip bound.

        ``x <= limit`` is false for NaN, so one comparison per number covers NaN, Inf
        and every bound (the lowest skip bound of that number, or the largest finite
        value of its dtype).
        """
        norm_limit = _limit(bounds, "grad_norm", norm_dtype)
        is_ok: Tensor | bool = grad_norm <= norm_limit
        if loss is not None and loss_dtype is not None:
            loss_limit = _limit(bounds, "loss", loss_dtype)
            is_ok = is_ok & is_within(loss, -_largest(loss_dtype), loss_limit)
        if norm_stats is not None:
            # NaN is 0 there already: a non-finite statistic is the weight check's to tell
            is_ok = is_ok & (norm_stats <= _limit(bounds, "norm_stats", torch.float32))
        return is_ok

    def max_norm(self, grad_norm: Num, bounds: Sequence[Bound] = ()) -> Num | None:
        """The max total norm of this step: the policy's, emergency rule applied, and, for a
        norm above the spike guard's bound, at most the norm's level (``None``: clipping is
        off)."""
        if self.clip is None:
            return None
        max_norm = self.clip.max_norm(grad_norm)
        if self.emergency_clip is not None:
            max_norm = self.emergency_clip.limit(max_norm, grad_norm)
        for bound in bounds:
            if bound.name == _SPIKE_CLIP and bound.clip_to is not None:
                level = bound.clip_to
                max_norm = where(grad_norm > bound.value, clamp(max_norm, high=level), max_norm)
        return max_norm

    def clips_above(self) -> float | None:
        """The norm above which the next step is clipped (``None``: clipping is off; ``inf``:
        nothing clips yet): the lowest of the policy's own level (its optional
        ``clips_above()``: ZClip's), the spike guard's bound and the emergency threshold."""
        if self.clip is None:
            return None
        levels = [math.inf]
        own = getattr(self.clip, "clips_above", None)  # an optional member of a clip policy
        if own is not None:
            levels.append(float(own()))
        if self.spike is not None and self.spike.watches("grad_norm"):
            bound = self.spike.bound("grad_norm")
            if bound is not None:
                levels.append(bound)
        if self.emergency_clip is not None and self.emergency_clip.threshold is not None:
            levels.append(self.emergency_clip.threshold)
        return min(levels)

    # -- read, then decide -------------------------------------------------------------

    def decide(
        self,
        step: int,
        stats: GradStats,
        amp_found_inf: Tensor | None,
        clipped_in_place: Tensor | None,
    ) -> tuple[StepVerdict, Tensor | None]:
        """Read the norm and the loss, decide in floats; return the verdict and the
        coefficient to multiply the gradients by (``None``: leave them as they are)."""
        tensors = [stats.grad_norm]
        if stats.loss is not None:
            tensors.append(stats.loss)
        if stats.norm_stats is not None:
            tensors.append(stats.norm_stats)
        flags = {}
        if amp_found_inf is not None:
            flags["amp_overflow"] = amp_found_inf > 0
        if clipped_in_place is not None:
            flags["clipped_in_place"] = clipped_in_place
        host, values = _read(flags, tensors)
        grad_norm, loss = values[0], (values[1] if stats.loss is not None else None)
        norm_stats = values[-1] if stats.norm_stats is not None else None
        norm_dtype, loss_dtype = _dtypes(stats)
        bounds = self.bounds(norm_dtype, loss_dtype, norm_stats is not None)
        is_ok = bool(self.passes(grad_norm, loss, bounds, norm_dtype, loss_dtype, norm_stats))
        is_ok = is_ok and not host.get("amp_overflow", False)
        max_norm = self.max_norm(grad_norm, bounds)
        coefficient, value = None, 1.0
        if (
            is_ok
            and max_norm is not None
            and max_norm < (grad_norm + NORM_EPS) * (1 + _CLIP_MARGIN)
        ):
            coefficient = clip_coefficient(max_norm, stats.grad_norm)
            # Free on the CPU; elsewhere the host's float64 value of the same formula.
            value = (
                coefficient.item()
                if coefficient.device.type == "cpu"
                else min(1.0, float(max_norm) / (grad_norm + NORM_EPS))
            )
            if value >= 1.0:
                coefficient, value = None, 1.0  # a multiply by 1.0 changes no bit
        verdict = _verdict(
            step,
            grad_norm,
            loss,
            bounds,
            is_ok,
            amp_overflow=host.get("amp_overflow", False),
            clip_threshold=None if max_norm is None else float(max_norm),
            clip_coefficient=value,
            clipped_in_place=host.get("clipped_in_place", False),
            norm_stats=norm_stats,
        )
        return verdict, coefficient

    # -- decide on the device, read after the update -----------------------------------

    def decide_on_device(
        self,
        stats: GradStats,
        amp_found_inf: Tensor | None,
        clipped_in_place: Tensor | None,
    ) -> PendingVerdict:
        """The verdict as 0-dim tensors (no sync): ``is_ok`` for ``found_inf``, and the
        coefficient for ``grad_scale``."""
        grad_norm = stats.grad_norm
        norm_dtype, loss_dtype = _dtypes(stats)
        norm_stats = stats.norm_stats
        bounds = self.bounds(norm_dtype, loss_dtype, norm_stats is not None)
        if norm_stats is not None:
            norm_stats = _on(norm_stats, grad_norm.device)
        is_ok = self.passes(grad_norm, stats.loss, bounds, norm_dtype, loss_dtype, norm_stats)
        assert isinstance(is_ok, Tensor)
        flags: dict[str, Tensor] = {}
        if amp_found_inf is not None:
            flags["amp_overflow"] = _on(amp_found_inf > 0, grad_norm.device)
            is_ok = is_ok & ~flags["amp_overflow"]
        if clipped_in_place is not None:
            flags["clipped_in_place"] = clipped_in_place
        flags["is_ok"] = is_ok
        numbers = {"grad_norm": grad_norm}
        if stats.loss is not None:
            numbers["loss"] = stats.loss
        if norm_stats is not None:
            numbers["norm_stats"] = norm_stats
        max_norm = self.max_norm(grad_norm, bounds)
        coefficient = None
        if max_norm is not None:
            coefficient = clip_coefficient(max_norm, grad_norm)
            numbers["coefficient"] = coefficient
            if isinstance(max_norm, Tensor):
                numbers["clip_threshold"] = max_norm
        host_threshold = None if isinstance(max_norm, Tensor) or max_norm is None else max_norm
        return PendingVerdict(bounds, is_ok, coefficient, flags, numbers, host_threshold)

    def read(
        self, step: int, pending: PendingVerdict, weights_ok: Tensor | None = None
    ) -> StepVerdict:
        """The step's one read of a device verdict (and of the weight check, if given)."""
        flags = dict(pending.flags)
        if weights_ok is not None:
            flags["weights_ok"] = weights_ok
        host, values = read_host(flags, pending.numbers)
        threshold = values.get("clip_threshold", pending.clip_threshold)
        verdict = _verdict(
            step,
            values["grad_norm"],
            values.get("loss"),
            pending.bounds,
            host["is_ok"],
            amp_overflow=host.get("amp_overflow", False),
            clip_threshold=None if threshold is None else float(threshold),
            clip_coefficient=min(values.get("coefficient", 1.0), 1.0),
            clipped_in_place=host.get("clipped_in_place", False),
            weights_ok=host.get("weights_ok"),
            norm_stats=values.get("norm_stats"),
        )
        return verdict


def _verdict(
    step: int,
    grad_norm: float,
    loss: float | None,
    bounds: Sequence[Bound],
    is_accepted: bool,
    *,
    amp_overflow: bool,
    clip_threshold: float | None,
    clip_coefficient: float,
    clipped_in_place: bool,
    weights_ok: bool | None = None,
    norm_stats: float | None = None,
) -> StepVerdict:
    """The verdict from host numbers: which bounds they crossed tells why a step was skipped."""
    values = {"grad_norm": grad_norm, "loss": loss, "norm_stats": norm_stats}
    crossed = set()
    for bound in bounds:
        value = values[bound.signal]
        if value is not None and math.isfinite(value) and value > bound.value:
            crossed.add(bound.name)
    reason, rule = None, None
    if not is_accepted:
        reason = _skip_reason(grad_norm, loss, crossed, amp_overflow)
        clip_coefficient = 1.0
        if reason is SkipReason.RULE:
            rule = min(name for name in crossed if name.startswith(_RULE))[len(_RULE) :]
    return StepVerdict(
        step=step,
        grad_norm=grad_norm,
        loss=loss,
        is_accepted=is_accepted,
        skip_reason=reason,
        clip_threshold=clip_threshold,
        clip_coefficient=clip_coefficient,
        is_clipped=is_accepted and (clip_coefficient < 1.0 or clipped_in_place),
        is_emergency=is_accepted and "emergency_clip" in crossed,
        is_spike_clipped=is_accepted and _SPIKE_CLIP in crossed,
        weights_ok=weights_ok,
        rule=rule,
    )


def _skip_reason(
    grad_norm: float, loss: float | None, crossed: set[str], amp_overflow: bool
) -> SkipReason:
    if amp_overflow:
        return SkipReason.AMP_OVERFLOW
    if not math.isfinite(grad_norm):
        return SkipReason.NONFINITE_GRADS
    if loss is not None and not math.isfinite(loss):
        return SkipReason.NONFINITE_LOSS
    for name, reason in _SKIPS.items():
        if name in crossed:
            return reason
    if any(name.startswith(_RULE) for name in crossed):
        return SkipReason.RULE
    # A finite norm at the dtype's largest value (no bound crossed, not <= the limit)
    # cannot happen; were it to, the gradients are what is wrong.
    return SkipReason.NONFINITE_GRADS


def _limit(bounds: Sequence[Bound], signal: str, dtype: torch.dtype) -> float:
    """The largest ``signal`` value that does not skip the step (in ``dtype``)."""
    limit = _largest(dtype)
    for bound in bounds:
        if bound.signal == signal and (bound.name in _SKIPS or bound.name.startswith(_RULE)):
            limit = min(limit, bound.value)
    return limit


def _dtypes(stats: GradStats) -> tuple[torch.dtype, torch.dtype | None]:
    return stats.grad_norm.dtype, None if stats.loss is None else stats.loss.dtype


def _read(flags: dict[str, Tensor], tensors: list[Tensor]) -> tuple[dict[str, bool], list[float]]:
    """Host values of a few 0-dim tensors: ``.item()`` on the CPU (no sync, no kernel),
    else one transfer."""
    if all(type(t) is Tensor and t.device.type == "cpu" for t in (*flags.values(), *tensors)):
        return {name: bool(flag.item()) for name, flag in flags.items()}, [
            t.item() for t in tensors
        ]
    host, values = read_host(flags, {str(i): t for i, t in enumerate(tensors)})
    return host, [values[str(i)] for i in range(len(tensors))]


def _on(flag: Tensor, device: torch.device) -> Tensor:
    """``flag`` on ``device`` (no op when it is there already)."""
    return flag if flag.device == device else flag.to(device)


def _rounded(value: float, dtype: Any) -> float:
    """``value`` as a ``dtype`` tensor holds it (how a kernel comparing a ``dtype`` tensor
    with the Python number ``value`` sees it), capped at the dtype's largest finite value."""
    if dtype == torch.float32:
        with np.errstate(over="ignore"):  # a bound beyond float32 is capped below
            value = float(np.float32(value))  # the same rounding, without a tensor
    elif dtype != torch.float64:
        value = float(torch.tensor(value, dtype=dtype))
    largest = _largest(dtype)
    return min(max(value, -largest), largest)


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)
