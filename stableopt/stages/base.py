"""The stage protocol: what every stage of the step pipeline provides.

A stage is a small object with its own state. The pipeline calls the method of
its role (a clip policy's :meth:`ClipPolicy.max_norm`, the spike guard's bound,
...) and, once a step is over, hands every stage the step's numbers through
:meth:`Stage.observe`. Its state is plain numbers and tensors, returned by
``state_dict()`` and restored by ``load_state_dict()``, so a checkpoint resumes
exactly. :class:`~stableopt.SafeOptimizer` checks a stage against its role's
protocol (structurally, not by class), so your own object plugs in wherever it
has the methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from stableopt._num import Num

__all__ = ["ClipPolicy", "StepNumbers", "Stage"]


@dataclass(frozen=True, slots=True)
class StepNumbers:
    """The host numbers of one finished step, as every stage observes them.

    Attributes:
        grad_norm: the total L2 norm of the gradients before clipping (``nan``/``inf``
            when they were not finite; unscaled under GradScaler).
        loss: the step's loss (mean over ranks), or ``None`` when none was given.
        is_accepted: the update ran: the step was not skipped. A history must never
            take the numbers of a rejected step.
        step: the number of the step (``1`` for the first ``step()`` call).
    """

    grad_norm: float
    loss: float | None = None
    is_accepted: bool = True
    step: int = 0


@runtime_checkable
class Stage(Protocol):
    """What every stage provides.

    Attributes:
        name: a short identifier of the stage, used in events and ``repr``
            (``"zscore"``, ``"spike"``, ...).
    """

    name: str

    def observe(self, numbers: StepNumbers) -> None:
        """Take a finished step's numbers (a history appends them if the step was accepted)."""

    def state_dict(self) -> dict[str, Any]:
        """The stage's state: plain numbers and tensors only."""

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@runtime_checkable
class ClipPolicy(Stage, Protocol):
    """A gradient clip policy: the largest total norm allowed this step.

    The pipeline turns :meth:`max_norm` into one clip coefficient,
    ``min(1, max_norm / (grad_norm + 1e-6))`` (``clip_grad_norm_``'s), so a policy
    only says where the limit is. Subclass this protocol to inherit the defaults
    (no history, no state), or write any class with the same members::

        class HalfOfFirst(ClipPolicy):
            name = "half_of_first"

            def __init__(self) -> None:
                self.first: float | None = None

            def max_norm(self, grad_norm):
                return math.inf if self.first is None else self.first / 2

            def observe(self, numbers):
                if numbers.is_accepted and self.first is None:
                    self.first = numbers.grad_norm

            def state_dict(self):
                return {"first": self.first}

            def load_state_dict(self, state_dict):
                self.first = state_dict["first"]

    Optional: a policy that rescales the gradients itself (unit-wise, like
    :class:`~stableopt.AGCClip`) has ``clips_in_place = True`` and a method
    ``clip_in_place(grads, params) -> Tensor`` that rescales ``grads`` in place and
    returns a 0-dim bool tensor (was anything clipped); its :meth:`max_norm` is ``inf``.
    """

    name: str = "clip"

    def max_norm(self, grad_norm: Num) -> Num:
        """The largest total norm allowed this step, given its pre-clip norm.

        ``grad_norm`` is a float (the host decides: the result must be a float) or a
        0-dim tensor (a fused inner optimizer on an accelerator: the result must be a
        float or a tensor, computed without reading anything to the host). ``inf``
        means no clipping.
        """
        ...

    def observe(self, numbers: StepNumbers) -> None:
        """Take the step's pre-clip norm into the history (the default keeps none)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The policy's state (the default has none)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict` (the default has none)."""
        return None
