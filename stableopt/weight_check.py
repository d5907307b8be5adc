"""The verify stage: after ``step()``, no weight and no optimizer state is NaN or Inf.

``"every_step"`` (the default): after every update, one multi-tensor max-abs pass over the
parameters the update wrote and their optimizer state (``exp_avg``, momentum buffers,
...): exact for every dtype (no sum of squares to overflow), so an update that writes a
non-finite value is undone within the same ``step()``. A step that did not update is
checked over every parameter and its state, so a corruption that appeared between steps (a
bit flip, user code) is found at the next ``step()`` even when it skips. Parameters with no
gradient (frozen ones) are not read every step: a snapshot verifies them (every
``Rollback.every_steps`` good steps). ``"params"``: the same over the parameters only (a
third of the bytes for AdamW; a non-finite state that does not reach the weights in the
same step is found by the next snapshot). ``"lazy"``: only when a step's gradients or loss
are non-finite and before every snapshot, so a corrupting update is undone at the next step.
``"off"``: never.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor
from torch.optim import Optimizer

from stableopt._checks import check_choice
from stableopt.grad_norms import bad_params, finite_flags, read_host, state_tensors
from stableopt.verdict import StepVerdict

__all__ = ["WEIGHT_CHECKS", "WeightCheck"]

WEIGHT_CHECKS = ("every_step", "params", "lazy", "off")


class WeightCheck:
    """When to check the weights (see the module docstring), and the check itself.

    Args:
        mode: ``"every_step"`` (default), ``"params"``, ``"lazy"`` or ``"off"``.
    """

    def __init__(self, mode: str = "every_step") -> None:
        self.mode = check_choice("check_weights", mode, WEIGHT_CHECKS)

    @property
    def after_every_update(self) -> bool:
        """Whether the values an update wrote are checked in the same step."""
        return self.mode in ("every_step", "params")

    def tensors(self, optimizer: Optimizer, params: list[Tensor]) -> tuple[list[Tensor], list[int]]:
        """What this mode reads for ``params``, and for each tensor its parameter's index in
        ``params``."""
        tensors: list[Tensor] = []
        owners: list[int] = []
        for index, param in enumerate(params):
            tensors.append(param)
            owners.append(index)
            if self.mode != "params":
                state = state_tensors(optimizer, param)
                tensors.extend(state)
                owners.extend([index] * len(state))
        return tensors, owners

    def all_finite(self, optimizer: Optimizer, params: list[Tensor]) -> Tensor | None:
        """The check after an update, as one 0-dim device flag (``None``: this mode does not
        check after updates)."""
        if not self.after_every_update:
            return None
        return finite_flags(self.tensors(optimizer, params)[0]).all()

    def verify(
        self,
        verdict: StepVerdict,
        optimizer: Optimizer,
        updated: list[Tensor],
        every: list[Tensor],
        snapshot_due: bool,
    ) -> StepVerdict:
        """``verdict`` with ``weights_ok`` (and which parameters are bad) filled in where this
        step needs a check.

        ``updated``: the parameters this step's update wrote; ``every``: all of them.
        """
        if self.mode == "off":
            return verdict
        if verdict.weights_ok is False:
            if not verdict.bad_params and self.after_every_update:  # read on the device
                return self._checked(verdict, optimizer, updated, every)
            return verdict
        if self.after_every_update:
            if verdict.weights_ok is None:
                checked = updated if verdict.is_accepted else every
                return self._checked(verdict, optimizer, checked, every)
            return verdict
        # lazy: a NaN weight shows itself as non-finite gradients or loss at the next step,
        # and a snapshot must never copy a corrupted state
        if (
            not verdict.grads_finite
            or not verdict.loss_finite
            or (verdict.is_accepted and snapshot_due)
        ):
            return self._checked(verdict, optimizer, every, every)
        return verdict

    def _checked(
        self, verdict: StepVerdict, optimizer: Optimizer, checked: list[Tensor], every: list[Tensor]
    ) -> StepVerdict:
        if not checked:
            return replace(verdict, weights_ok=True)
        tensors, owners = self.tensors(optimizer, checked)
        flags = finite_flags(tensors)
        host, _ = read_host({"ok": flags.all()}, {})
        if host["ok"]:
            return replace(verdict, weights_ok=True)
        return replace(
            verdict, weights_ok=False, bad_params=bad_params(flags, owners, checked, every)
        )
