"""The inner update: the wrapped optimizer's ``step()`` at our LR factor, and GradScaler's protocol.

Two ways to run it, matching the gate's two ways to decide (:mod:`stableopt.gate`):

* decided before the update: the gradients are multiplied by the clip coefficient
  (``clip_grad_norm_``'s bits) and the inner ``step()`` runs only if the step was
  accepted; a fused kernel still divides by GradScaler's scale (a power of two:
  exact);
* decided on the device (fused only): the kernel reads the skip in ``found_inf`` and
  divides by ``grad_scale``, which carries GradScaler's scale and ``1 / coefficient``
  in one divisor, so clipping and skipping cost no pass over the gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.optim.optimizer as optim_module
from torch import Tensor
from torch.optim import Optimizer

from stableopt.grad_norms import scale_
from stableopt.stages.lr_factor import scaled_lr

__all__ = ["InnerUpdate"]


class InnerUpdate:
    """Drive ``optimizer``'s update (see the module docstring).

    Args:
        optimizer: the wrapped optimizer.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def is_fused(self) -> bool:
        """The optimizer takes ``grad_scale`` and ``found_inf`` (torch's fused Adam, AdamW, SGD,
        Adagrad), as GradScaler drives it."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def amp_inputs(
        self, grads: list[Tensor], scaler_inputs: dict[str, Any], unscale_here: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """GradScaler's ``grad_scale`` and ``found_inf`` for this step, if it set them.

        ``scaler_inputs``: where GradScaler put them (the wrapper's ``__dict__``). A
        fused optimizer divides the gradients by the scale inside its kernel;
        otherwise, or when ``unscale_here`` (a policy that clips in place needs the true
        gradients), they are unscaled here, once.
        """
        amp_scale: Tensor | None = scaler_inputs.get("grad_scale")
        amp_found_inf: Tensor | None = scaler_inputs.get("found_inf")
        if amp_scale is not None and (not self.is_fused or unscale_here):
            scale_(grads, amp_scale.double().reciprocal().float())
            amp_scale = None
        return amp_scale, amp_found_inf

    def run(
        self,
        grads: list[Tensor],
        coefficient: Tensor | None,
        amp_scale: Tensor | None,
        lr_factor: float,
        lr_bounds: tuple[float, float | None],
        closure: Callable[[], Any] | None = None,
    ) -> None:
        """The update of an accepted step, the gradients multiplied by ``coefficient`` first.

        Multiplying here (not dividing in a fused kernel's ``grad_scale``) gives
        ``clip_grad_norm_``'s bits; GradScaler's scale still rides in ``grad_scale``.
        """
        if coefficient is not None and grads:
            scale_(grads, coefficient)
        with scaled_lr(self.optimizer.param_groups, lr_factor, *lr_bounds):
            if amp_scale is None:
                self._step(closure)
            else:
                self._fused_step(None, amp_scale, closure)

    def run_fused(
        self,
        is_ok: Tensor,
        coefficient: Tensor | None,
        amp_scale: Tensor | None,
        lr_factor: float,
        lr_bounds: tuple[float, float | None],
        closure: Callable[[], Any] | None = None,
    ) -> None:
        """A fused update that takes the verdict on the device: the skip in ``found_inf``,
        the clip coefficient in ``grad_scale`` (with GradScaler's scale: one divisor)."""
        divisor = None if coefficient is None else coefficient.to(torch.float32).reciprocal()
        if divisor is not None and amp_scale is not None:
            divisor = amp_scale * divisor.to(amp_scale.device)
        grad_scale = divisor if divisor is not None else amp_scale
        with scaled_lr(self.optimizer.param_groups, lr_factor, *lr_bounds):
            self._fused_step((~is_ok).to(torch.float32), grad_scale, closure)

    def _fused_step(
        self,
        found_inf: Tensor | None,
        grad_scale: Tensor | None,
        closure: Callable[[], Any] | None,
    ) -> None:
        # GradScaler's protocol: the fused kernel divides every gradient by
        # grad_scale and leaves weights and state alone when found_inf is non-zero.
        inner: Any = self.optimizer
        if found_inf is not None:
            inner.found_inf = found_inf
        if grad_scale is not None:
            inner.grad_scale = grad_scale
        try:
            self._step(closure)
        finally:
            for name in ("found_inf", "grad_scale"):
                if name in inner.__dict__:
                    delattr(inner, name)

    def _step(self, closure: Callable[[], Any] | None) -> None:
        """The inner ``step()``, with the closure when there is one (LBFGS evaluates it
        again and again; any other optimizer once, which returns the evaluation the wrapper
        already made), and without torch's global optimizer hooks: they run once per
        ``step()``, around the wrapper's."""
        with _global_hooks_off():
            if closure is None:
                self.optimizer.step()
            else:
                self.optimizer.step(closure)


@contextmanager
def _global_hooks_off() -> Iterator[None]:
    """Within the block, torch's global optimizer step hooks do not run (they are put back
    after; nothing to do when there are none, the usual case)."""
    hook_dicts: tuple[Any, Any] = (
        optim_module._global_optimizer_pre_hooks,
        optim_module._global_optimizer_post_hooks,
    )
    if not any(hook_dicts):
        yield
        return
    saved: list[dict[Any, Any]] = [dict(hooks) for hooks in hook_dicts]
    for hooks in hook_dicts:
        hooks.clear()
    try:
        yield
    finally:
        for hooks, items in zip(hook_dicts, saved):
            hooks.update(items)
