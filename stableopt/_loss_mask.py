"""Masking padded positions out of a loss (for SafeLoss): checking ``lengths``, the masked mean.

Shapes and dtypes are read on the host; the values of ``lengths`` are checked on the
host where that is free (a CPU tensor), and on the device for a CUDA tensor
(``torch._assert_async``, no sync); see :func:`check_lengths`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Unreduced",
    "check_lengths",
    "class_weights",
    "masked_loss",
    "masked_reduce",
    "time_mask",
]

_REDUCTIONS = ("mean", "sum", "none")


class Unreduced:
    """The elementwise form of a loss, which masking needs, and the reduction it replaces.

    ``reduction_default``: the default of the loss's ``reduction`` parameter, ``None``
    if it has none. A module with a ``reduction`` attribute gets a shallow copy set to
    ``"none"``; it is deliberately not a registered submodule: it shares the wrapped
    loss's parameter and buffer dicts (so ``.to()`` moves both) and must not appear
    twice in ``state_dict()``.
    """

    def __init__(
        self,
        loss: Callable[..., Tensor],
        reduction_default: str | None,
        elementwise: bool,
        name: str,
    ) -> None:
        self.loss = loss
        self.reduction_default = reduction_default
        self.elementwise = elementwise
        self.name = name
        self.twin: Callable[..., Tensor] | None = None
        if isinstance(getattr(loss, "reduction", None), str) and isinstance(loss, nn.Module):
            twin = copy.copy(loss)
            object.__setattr__(twin, "reduction", "none")
            self.twin = twin

    def call(self, kwargs: dict[str, Any]) -> tuple[Callable[..., Tensor], str, dict[str, Any]]:
        """The elementwise callable, the reduction to apply, and the kwargs to pass it."""
        if self.elementwise:
            return self.loss, "mean", kwargs
        if self.twin is not None:
            reduction = getattr(self.loss, "reduction", "mean")
        elif self.reduction_default is not None:
            reduction = kwargs.get("reduction", self.reduction_default)
            kwargs = {**kwargs, "reduction": "none"}
        else:
            raise TypeError(
                "lengths= needs an elementwise loss: a loss with a `reduction` attribute "
                "(nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.BCEWithLogitsLoss, ...), a function "
                "with a `reduction` parameter (F.mse_loss, ...), or SafeLoss(fn, elementwise=True) "
                f"for a function returning unreduced values; got {self.name}"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"lengths= supports the reductions {list(_REDUCTIONS)}, the loss has {reduction!r}"
            )
        return (self.loss if self.twin is None else self.twin), reduction, kwargs


def check_lengths(lengths: object, batch_size: int, steps: int, where: str) -> Tensor:
    """Return ``lengths`` if it is 1-D, integer, ``batch_size`` long, each in ``[0, steps]``.

    Type, dtype and shape raise ``TypeError``/``ValueError`` at once. The values of a
    CPU tensor are read on the host, which is free (``ValueError``). A CUDA tensor, or a
    CPU one under ``torch.compile`` (where a host read would break the graph), is
    checked on the device with ``torch._assert_async``: nothing waits, and a bad value
    stops the run at the device's next synchronisation (on CUDA a device-side
    assertion, which ends the process; under compile on the CPU a ``RuntimeError``).
    On another accelerator the values are read on the host: one blocking read.
    """
    accepted = (
        f"a 1-D integer tensor of valid lengths, one per batch item (shape ({batch_size},)), "
        f"each between 0 and {steps}, the length of {where}"
    )
    if not isinstance(lengths, Tensor):
        raise TypeError(f"lengths must be {accepted}; got {type(lengths).__name__}")
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"lengths must be {accepted}; got dtype {lengths.dtype}")
    if lengths.ndim != 1 or lengths.shape[0] != batch_size:
        raise ValueError(f"lengths must be {accepted}; got shape {tuple(lengths.shape)}")
    if lengths.numel() == 0:
        return lengths
    device = lengths.device.type
    if device in ("cpu", "cuda") and (device == "cuda" or torch.compiler.is_compiling()):
        in_range = ((lengths >= 0) & (lengths <= steps)).all()
        torch._assert_async(in_range, f"lengths must be {accepted}")
        return lengths
    # On the CPU this read is free; on another accelerator it is one blocking read.
    low, high = int(lengths.min()), int(lengths.max())
    if low < 0 or high > steps:
        raise ValueError(f"lengths must be {accepted}; got values from {low} to {high}")
    return lengths


def time_mask(
    lengths: Tensor, like: Tensor, time_dim: int, steps: int, what: str = "elementwise loss"
) -> Tensor:
    """``m[b, ..., t, ...] = t < lengths[b]``, shaped to broadcast against ``like``.

    ``like`` (the ``what``) must have the batch at dim 0 and ``steps`` positions at
    ``time_dim`` (negative): anything else would mask another axis.
    """
    position = like.ndim + time_dim
    if (
        like.ndim < 2
        or position < 1
        or like.shape[0] != lengths.shape[0]
        or like.shape[position] != steps
    ):
        raise ValueError(
            f"the {what} has shape {tuple(like.shape)}: masking needs the batch "
            f"({lengths.shape[0]}) at dim 0 and the time ({steps} steps) at dim {time_dim}"
        )
    valid = torch.arange(steps, device=like.device) < lengths.to(like.device).unsqueeze(1)
    shape = [1] * like.ndim
    shape[0], shape[position] = lengths.shape[0], steps
    return valid.view(shape)


def class_weights(target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """What each class-index target counts for in a mean: ``w[y]``, and 0 where ``y`` is ignored.

    The denominator of ``CrossEntropyLoss``/``NLLLoss``'s ``"mean"`` is
    ``sum_i w[y_i] [y_i != ignore_index]``, not the number of elements.
    """
    is_ignored = target == ignore_index
    if weight is None:
        return (~is_ignored).to(torch.float32)
    picked = weight.to(target.device)[target.masked_fill(is_ignored, 0)]
    return picked.masked_fill(is_ignored, 0)


def masked_reduce(
    elementwise: Tensor, keep: Tensor, reduction: str, counts: Tensor | None = None
) -> Tensor:
    """Reduce an elementwise loss over the kept positions only.

    ``"mean"``: ``sum_i k_i l_i / sum_i k_i c_i`` (``c_i = 1`` unless ``counts`` is
    given), and 0 when nothing is kept (zero gradients, not NaN); ``"sum"``:
    ``sum_i k_i l_i``; ``"none"``: ``l`` with the dropped positions set to 0.
    ``torch.where`` rather than a product, so a NaN in a padded position stays out.
    """
    kept = torch.where(keep, elementwise, elementwise.new_zeros(()))
    if reduction == "none":
        return kept
    total = kept.sum()
    if reduction == "sum":
        return total
    keep = keep.expand_as(elementwise)
    weights = keep.to(elementwise.dtype) if counts is None else torch.where(keep, counts, 0)
    denominator = weights.sum().to(total.dtype)
    return total / torch.where(denominator > 0, denominator, denominator.new_ones(()))


def masked_loss(
    unreduced: Callable[..., Tensor],
    reduction: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    lengths: Tensor,
    time_dim: int,
    *,
    class_weight: Tensor | None,
    ignore_index: int,
    by_class: bool,
) -> Tensor:
    """The loss over the valid positions of ``args[0]``/``args[1]`` (see :func:`masked_reduce`).

    ``unreduced(*args, **kwargs)`` gives the elementwise loss; ``time_dim`` (negative)
    is the same dim of the prediction, the target and the elementwise loss, and
    ``lengths`` is already checked. Padded positions of the prediction and target are
    set to 0 (class-index targets: ``ignore_index`` when ``by_class``) first. With
    ``by_class`` and a class-index target, each position counts :func:`class_weights`
    in the mean.
    """
    pred, target = args[0], args[1]
    steps = int(pred.shape[time_dim])
    lengths = lengths.to(pred.device)  # once, not per mask
    is_class_index = pred.ndim == target.ndim + 1 and not target.is_floating_point()
    # Padded inputs are replaced before the loss sees them, so that garbage there
    # (NaN frames past a stop token, a pad label out of range) reaches neither the
    # value nor, through torch.where's backward, the gradient.
    pred = torch.where(time_mask(lengths, pred, time_dim, steps, "prediction"), pred, 0)
    padding = ignore_index if is_class_index and by_class else 0
    target = torch.where(time_mask(lengths, target, time_dim, steps, "target"), target, padding)
    elementwise = unreduced(pred, target, *args[2:], **kwargs)
    keep = time_mask(lengths, elementwise, time_dim, steps)
    counts = None
    if by_class and is_class_index:
        counts = class_weights(target, class_weight, ignore_index).to(elementwise.dtype)
    return masked_reduce(elementwise, keep, reduction, counts)
