"""Whether a step may run and how much to clip it: the decision, on the device or on the host.

Kept apart from :mod:`stableopt.optimizer` (the ``Optimizer`` contract and the step)
because it is one concern: turning a step's gradient norm and loss into the
verdict (skip or not, and why), the clip coefficient and the numbers the host keeps.

Two ways to the same verdict:

* **On the device** (gradients on an accelerator, or sharded): every number stays
  a 0-dim tensor and the decision is a handful of kernels, so the update can be
  queued before anything is read (a fused optimizer takes the skip in
  ``found_inf``). A skip is a comparison of each number with a bound the host
  holds (the spike guard's, ``skip_above``; the dtype's largest finite value
  without one): NaN, Inf, spikes and garbage cost two kernels for the norm and
  two for the loss. The bounds are rounded to the number's dtype, the precision the
  device compares in, so the host tells from the numbers it reads afterwards which
  bound was crossed, exactly.
* **On the host** (every gradient a plain CPU tensor): reading a CPU number is not a
  sync, and a kernel costs more than the arithmetic it does, so the norm and the loss
  are read at once and everything is decided in Python floats, with the same
  bounds and the same formulas. The clip coefficient is computed (with
  ``clip_grad_norm_``'s expression, on the norm tensor) only on a step that clips,
  and applied only then: a healthy step pays one norm pass and no multiply.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from stableopt.clipping import NORM_EPS, ClipDecision, ClipPolicy, clip_coefficient
from stableopt.emergency import EmergencyClip
from stableopt.lr import EmergencyLR
from stableopt.spike import SpikeGuard
from stableopt.stats import GradStats, read_host

__all__ = ["HostVerdict", "StepGate"]

#: A host decision computes the coefficient (3 kernels) when the max norm is within
#: this relative margin of the norm: float32 rounding decides at the boundary.
_CLIP_MARGIN = 1e-5


class HostVerdict(NamedTuple):
    """A step decided on the host: the flags, the numbers, and the coefficient to apply."""

    host: dict[str, bool]
    values: dict[str, float]
    coefficient: Tensor | None


class StepGate:
    """Mixin of :class:`~stableopt.SafeOptimizer`: the step's verdict and clip coefficient."""

    clip: ClipPolicy | None
    emergency_clip: EmergencyClip | None
    spike: SpikeGuard | None
    emergency_lr: EmergencyLR | None
    _bounds: dict[str, tuple[str, float]]
    _last_grad_norm: float | None
    _last_loss: float | None
    _last_threshold: float | None

    #: Decide on the host when the gradients allow it (the tests turn it off to run the
    #: device path on CPU tensors).
    _host_decisions = True

    def _decides_on_host(self, grads: list[Tensor]) -> bool:
        """Every gradient a plain CPU tensor, and a clip policy that can decide from a float."""
        if not self._host_decisions or (self.clip is not None and self.clip.clips_in_place):
            return False
        return all(type(g) is Tensor and g.device.type == "cpu" for g in grads)

    def _step_bounds(self, has_clip: bool) -> dict[str, tuple[str, float]]:
        """This step's bounds: name -> (the signal it bounds, the value above which it trips)."""
        bounds: dict[str, tuple[str, float]] = {}
        if self.spike is not None:
            for signal in ("grad_norm", "loss"):
                bound = self.spike.bound(signal) if self.spike.watches(signal) else None
                if bound is not None:
                    bounds[f"{signal}_spike"] = (signal, bound)
        if has_clip and self.emergency_clip is not None:
            if self.emergency_clip.skip_above is not None:
                bounds["garbage"] = ("grad_norm", self.emergency_clip.skip_above)
            bounds["emergency_clip"] = ("grad_norm", self.emergency_clip.threshold)
        return bounds

    def _tell(self, host: dict[str, bool], values: dict[str, float]) -> None:
        """The flags the numbers tell (finite, bounds crossed, LR triggers); keep the numbers."""
        grad_norm = values["grad_norm"]
        loss = values.get("loss")
        self._last_grad_norm = grad_norm
        self._last_loss = loss
        self._last_threshold = values.get("clip_threshold")
        host["grads_finite"] = math.isfinite(grad_norm)
        if loss is not None:
            host["loss_finite"] = math.isfinite(loss)
        for name, (signal, bound) in self._bounds.items():
            value = values.get(signal)
            host[name] = value is not None and math.isfinite(value) and value > bound
        if "coefficient" in values:  # or clipped in place (a flag of its own)
            host["clipped"] = host.get("clipped", False) or values["coefficient"] < 1.0
        if self.emergency_lr is not None:
            host |= self.emergency_lr.triggers(grad_norm, loss)

    # -- on the host --------------------------------------------------------------------

    def _host_verdict(self, stats: GradStats, amp_found_inf: Tensor | None) -> HostVerdict:
        """Read the norm and the loss (CPU tensors: no sync) and decide in floats."""
        values = {"grad_norm": stats.grad_norm.item()}
        if stats.loss is not None:
            values["loss"] = stats.loss.item()
        host: dict[str, bool] = {}
        if amp_found_inf is not None:
            host["amp_overflow"] = amp_found_inf.item() > 0
        self._bounds = self._step_bounds(self.clip is not None)
        self._tell(host, values)
        skip_reasons = ("amp_overflow", "garbage", "loss_spike", "grad_norm_spike")
        host["is_ok"] = (
            host["grads_finite"]
            and host.get("loss_finite", True)
            and not any(host.get(name, False) for name in skip_reasons)
        )
        coefficient = None
        if self.clip is not None:
            grad_norm = values["grad_norm"]
            max_norm = self.clip.max_norm(grad_norm) if math.isfinite(grad_norm) else math.inf
            if self.emergency_clip is not None:
                max_norm = self.emergency_clip.limit(max_norm, grad_norm)
            values["clip_threshold"] = self._last_threshold = float(max_norm)
            if host["is_ok"] and max_norm < (grad_norm + NORM_EPS) * (1 + _CLIP_MARGIN):
                coefficient = clip_coefficient(max_norm, stats.grad_norm)
                values["coefficient"] = coefficient.item()
                host["clipped"] = values["coefficient"] < 1.0
                if not host["clipped"]:
                    coefficient = None  # a multiply by 1.0 changes no bit
        return HostVerdict(host, values, coefficient)

    # -- on the device ------------------------------------------------------------------

    def _clip_decision(
        self, stats: GradStats, grads: list[Tensor], params: list[Tensor]
    ) -> ClipDecision | None:
        if self.clip is None:
            return None
        if self.emergency_clip is not None:
            return self.emergency_clip.decide(self.clip, stats.grad_norm, grads, params)
        return self.clip.decide(stats.grad_norm, grads, params)

    def _device_flags(
        self,
        stats: GradStats,
        decision: ClipDecision | None,
        amp_found_inf: Tensor | None,
    ) -> dict[str, Tensor]:
        """The device flags of this step; ``is_ok``: the update may run (see the module doc).

        What the host cannot tell from the numbers (GradScaler's overflow, an
        in-place clip) is a flag of its own.
        """
        grad_norm, loss = stats.grad_norm, stats.loss
        dtypes = {"grad_norm": grad_norm.dtype, "loss": None if loss is None else loss.dtype}
        self._bounds = {
            name: (signal, _rounded(bound, dtype))
            for name, (signal, bound) in self._step_bounds(decision is not None).items()
            if (dtype := dtypes[signal]) is not None
        }
        is_ok = grad_norm <= self._limit("grad_norm", grad_norm.dtype)
        if loss is not None:
            limit = self._limit("loss", loss.dtype)
            lowest = -_largest(loss.dtype)
            is_ok = is_ok & _on(loss.clamp(min=lowest, max=limit) == loss, grad_norm.device)
        flags: dict[str, Tensor] = {}
        if amp_found_inf is not None:
            flags["amp_overflow"] = _on(amp_found_inf > 0, grad_norm.device)
            is_ok = is_ok & ~flags["amp_overflow"]
        if decision is not None and decision.is_clipped is not None:
            flags["clipped"] = decision.is_clipped
        flags["is_ok"] = is_ok
        return flags

    def _limit(self, signal: str, dtype: torch.dtype) -> float:
        """The largest ``signal`` value that does not skip the step (in ``dtype``)."""
        limit = _largest(dtype)
        for name, (bounded, bound) in self._bounds.items():
            if bounded == signal and name != "emergency_clip":
                limit = min(limit, bound)
        return limit

    def _numbers(self, stats: GradStats, decision: ClipDecision | None) -> dict[str, Tensor]:
        """The numbers of this step the host reads with the flags (histories, events, stats)."""
        numbers = {"grad_norm": stats.grad_norm}
        if stats.loss is not None:
            numbers["loss"] = stats.loss
        if decision is not None:
            numbers["clip_threshold"] = decision.threshold
            if decision.coefficient is not None:
                numbers["coefficient"] = decision.coefficient
        return numbers

    def _read(
        self, flags: dict[str, Tensor], numbers: dict[str, Tensor]
    ) -> tuple[dict[str, bool], dict[str, float]]:
        """The step's one host read; the flags the numbers tell are derived from them."""
        host, values = read_host(flags, numbers)
        if "grad_norm" in values:
            self._tell(host, values)
        return host, values


def _on(flag: Tensor, device: torch.device) -> Tensor:
    """``flag`` on ``device`` (no op when it is there already)."""
    return flag if flag.device == device else flag.to(device)


def _rounded(value: float, dtype: Any) -> float:
    """``value`` as a ``dtype`` tensor holds it (how a kernel comparing a ``dtype`` tensor
    with the Python number ``value`` sees it), capped at the dtype's largest finite value."""
    if dtype == torch.float32:
        value = float(np.float32(value))  # the same rounding, without a tensor
    elif dtype != torch.float64:
        value = float(torch.tensor(value, dtype=dtype))
    largest = _largest(dtype)
    return min(max(value, -largest), largest)


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)
