"""Rerun triage: was it the data or the hardware?

A step that is about to be skipped for a non-finite or spiking loss or gradient is
evaluated once more: the closure runs again on the same batch, with the random number
generators (CPU, and CUDA where a parameter lives there) put back to where they were before
the first evaluation, so dropout draws the same masks. If the second evaluation is healthy,
the first was a *transient fault*: a result the same computation does not reproduce (silent
data corruption on a device, a flaky kernel), and the step goes on with the second
evaluation's gradients. If it fails again the fault is *reproducible*: the data or the
state, and the step is skipped as usual. Healthy steps never re-run; they pay one copy of
the RNG state. Only ``step(closure)`` can re-run (Lightning always passes a closure).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stableopt.stages.base import StepNumbers
from stableopt.verdict import SkipReason, StepVerdict

__all__ = ["Rerun", "RNGState"]

#: The skips a second evaluation can tell apart: what the batch and the computation
#: produce. GradScaler's overflow skip is its own dynamics, not a fault.
TRIAGED = frozenset(
    {
        SkipReason.NONFINITE_GRADS,
        SkipReason.NONFINITE_LOSS,
        SkipReason.ABOVE_SKIP_LIMIT,
        SkipReason.LOSS_SPIKE,
        SkipReason.GRAD_NORM_SPIKE,
    }
)


@dataclass(frozen=True)
class RNGState:
    """The generators' state before the first evaluation of a step's closure."""

    cpu: Tensor
    cuda: dict[int, Tensor]


class Rerun:
    """Re-run the closure of a step about to be skipped, once, with the RNG state restored.

    Side effects of the second evaluation are those of any second forward and backward:
    BatchNorm's running statistics move twice (with momentum 0.1, a second update of the same
    batch), a counter the user's code keeps in the forward counts twice, and a
    ``SafeLoss(optimizer=opt)`` inside the closure counts the batch twice. The second
    evaluation starts from no gradients (``p.grad = None``), as a closure's own
    ``zero_grad()`` would; a closure that accumulates onto gradients computed before
    ``step()`` is re-run without them. ``SafeOptimizer(rerun=None)`` turns it off.

    Attributes:
        by_device: transient faults per device (``"cuda:0"``, ``"cpu"``): the devices of the
            parameters whose step re-ran healthy.
    """

    name = "rerun"

    def __init__(self) -> None:
        self.by_device: dict[str, int] = {}

    def capture(self) -> RNGState:
        """The RNG state now: the CPU generator's, and every CUDA device's once CUDA is in use
        (a copy of a few bytes per generator: no device sync, no pass over the parameters)."""
        cuda: dict[int, Tensor] = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = dict(enumerate(torch.cuda.get_rng_state_all()))
        return RNGState(torch.get_rng_state(), cuda)

    def restore(self, state: RNGState) -> None:
        """Put the generators back to ``state``."""
        torch.set_rng_state(state.cpu)
        for device, value in state.cuda.items():
            torch.cuda.set_rng_state(value, device)

    def applies(self, verdict: StepVerdict) -> bool:
        """Whether ``verdict`` is a skip that a second evaluation can tell apart."""
        return verdict.skip_reason in TRIAGED

    def count(self, devices: Iterable[str]) -> None:
        """One transient fault on ``devices``."""
        for device in devices:
            self.by_device[device] = self.by_device.get(device, 0) + 1

    def observe(self, numbers: StepNumbers) -> None:
        """Nothing to take: the pipeline asks :meth:`applies` and calls :meth:`count`."""

    def state_dict(self) -> dict[str, Any]:
        """The transient-fault counts per device."""
        return {"by_device": dict(self.by_device)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.by_device = {str(k): int(v) for k, v in state_dict["by_device"].items()}

    def __repr__(self) -> str:
        return "Rerun()"
