"""Aligning a prediction with its target and masking padded positions (for SafeLoss).

Everything here reads ``.shape`` and ``.dtype`` only: no value leaves the device.

Layouts. Dim 0 is the batch. The prediction and the target have the same rank, or
the target has one dim fewer and the prediction carries a class dim at dim 1 (the
class-index layout of ``CrossEntropyLoss``/``NLLLoss``: ``(B, C, *)`` against
``(B, *)``). A time dim is named by its position counted from the end
(``-1`` = last), which is the same dim of the prediction, of the target and of an
elementwise loss in both layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ON_MISMATCH",
    "Aligned",
    "Mismatch",
    "align",
    "check_lengths",
    "class_weights",
    "masked_loss",
    "masked_reduce",
    "time_mask",
]

#: The accepted values of ``on_mismatch``.
ON_MISMATCH = ("trim", "error", "ignore")

_IGNORE_HINT = (
    " (for a loss with its own shape contract, such as CTCLoss, on_mismatch='ignore' "
    "turns these checks off)"
)


class Mismatch(NamedTuple):
    """Prediction and target differed in one non-batch dim and were trimmed."""

    dim: int  # the prediction's dim, counted from the front
    pred_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    pred_length: int
    target_length: int


class Aligned(NamedTuple):
    """The (possibly trimmed) pair and the time dim (negative), ``None`` if there is none."""

    pred: Tensor
    target: Tensor
    time_dim: int | None
    mismatch: Mismatch | None


def align(pred: Tensor, target: Tensor, *, time_dim: int | None, on_mismatch: str) -> Aligned:
    """Check the shapes of ``pred`` and ``target`` and trim a one-dim length mismatch.

    Exactly one non-batch dim of different sizes ``T_pred != T_target`` is a length
    mismatch: both are cut to ``min(T_pred, T_target)`` along it (``"trim"``), or it
    raises (``"error"``). A different batch size, an unrelated rank, two or more
    differing dims, or a mismatch in another dim than an explicit ``time_dim`` raise
    ``ValueError`` naming both shapes. ``"ignore"`` checks nothing.

    Returns:
        The pair, the time dim (the mismatched dim if any, else ``time_dim``, else
        the last dim; negative; ``None`` if the prediction has no dim for it) and
        the mismatch, if one was trimmed.
    """
    is_class_index = pred.ndim == target.ndim + 1 and pred.ndim >= 2
    if on_mismatch == "ignore":
        return Aligned(pred, target, _time_dim(pred, time_dim, is_class_index), None)
    shapes = f"prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)}"
    if pred.ndim != target.ndim and not is_class_index:
        raise ValueError(
            f"{shapes} have ranks {pred.ndim} and {target.ndim}: SafeLoss accepts equal ranks, or "
            f"a target with one dim fewer when dim 1 of the prediction holds classes{_IGNORE_HINT}"
        )
    pred_dims = [0, *range(2, pred.ndim)] if is_class_index else list(range(pred.ndim))
    differing = [(p, t) for t, p in enumerate(pred_dims) if pred.shape[p] != target.shape[t]]
    if not differing:
        return Aligned(pred, target, _time_dim(pred, time_dim, is_class_index), None)
    if differing[0][0] == 0:
        raise ValueError(f"{shapes} have different batch sizes (dim 0){_IGNORE_HINT}")
    if len(differing) > 1:
        raise ValueError(
            f"{shapes} differ in {len(differing)} dims {[p for p, _ in differing]}; "
            f"only a length mismatch in one non-batch dim can be trimmed{_IGNORE_HINT}"
        )
    pred_dim, target_dim = differing[0]
    mismatched = pred_dim - pred.ndim
    requested = _time_dim(pred, time_dim, is_class_index)
    if time_dim is not None and requested != mismatched:
        raise ValueError(
            f"{shapes} differ in dim {pred_dim}, not in time_dim={time_dim}: "
            "only the time dim may differ in length"
        )
    if on_mismatch == "error":
        raise ValueError(f"{shapes} differ in dim {pred_dim} (on_mismatch='error')")
    length = min(pred.shape[pred_dim], target.shape[target_dim])
    mismatch = Mismatch(
        pred_dim,
        tuple(pred.shape),
        tuple(target.shape),
        int(pred.shape[pred_dim]),
        int(target.shape[target_dim]),
    )
    return Aligned(
        pred.narrow(pred_dim, 0, length),
        target.narrow(target_dim, 0, length),
        mismatched,
        mismatch,
    )


def _time_dim(pred: Tensor, time_dim: int | None, is_class_index: bool) -> int | None:
    """``time_dim`` (default: the last dim) as a negative index into the prediction."""
    first = 2 if is_class_index else 1  # neither the batch nor the class dim
    if time_dim is None:
        return -1 if pred.ndim > first else None
    if not -pred.ndim <= time_dim < pred.ndim:
        raise ValueError(
            f"time_dim={time_dim} is out of range for a prediction of shape {tuple(pred.shape)}"
        )
    negative = time_dim - pred.ndim if time_dim >= 0 else time_dim
    if negative + pred.ndim < first:
        what = "the batch dim" if negative + pred.ndim == 0 else "the class dim"
        raise ValueError(
            f"time_dim={time_dim} is {what} of a prediction of shape {tuple(pred.shape)}"
        )
    return negative


def check_lengths(lengths: object, batch_size: int) -> Tensor:
    """Return ``lengths`` if it is a 1-D integer tensor of ``batch_size`` entries; raise otherwise."""
    accepted = f"a 1-D integer tensor of valid lengths, one per batch item (shape ({batch_size},))"
    if not isinstance(lengths, Tensor):
        raise TypeError(f"lengths must be {accepted}, got {type(lengths).__name__}")
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"lengths must be {accepted}, got dtype {lengths.dtype}")
    if lengths.ndim != 1 or lengths.shape[0] != batch_size:
        raise ValueError(f"lengths must be {accepted}, got shape {tuple(lengths.shape)}")
    return lengths


def time_mask(
    lengths: Tensor, like: Tensor, time_dim: int, what: str = "elementwise loss"
) -> Tensor:
    """``m[b, ..., t, ...] = t < lengths[b]``, shaped to broadcast against ``like``.

    ``like`` (the ``what``) has the batch at dim 0 and the time at ``time_dim`` (negative).
    """
    position = like.ndim + time_dim
    if like.ndim < 2 or position < 1 or like.shape[0] != lengths.shape[0]:
        raise ValueError(
            f"the {what} has shape {tuple(like.shape)}: masking needs the batch "
            f"({lengths.shape[0]}) at dim 0 and the time at dim {time_dim}"
        )
    steps = like.shape[position]
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
    time_dim: int | None,
    *,
    class_weight: Tensor | None,
    ignore_index: int,
    by_class: bool,
) -> Tensor:
    """The loss over the valid positions of ``args[0]``/``args[1]`` (see :func:`masked_reduce`).

    ``unreduced(*args, **kwargs)`` gives the elementwise loss. Padded positions of
    the prediction and target are set to 0 (class-index targets: ``ignore_index``
    when ``by_class``) first. With ``by_class`` and a class-index target, each
    position counts :func:`class_weights` in the mean.
    """
    pred, target = args[0], args[1]
    if time_dim is None:
        raise ValueError(
            f"lengths= needs a time dim: the prediction of shape {tuple(pred.shape)} "
            "has none besides the batch (and class) dim"
        )
    check_lengths(lengths, pred.shape[0])
    is_class_index = pred.ndim == target.ndim + 1 and not target.is_floating_point()
    # Padded inputs are replaced before the loss sees them, so that garbage there
    # (NaN frames past a stop token, a pad label out of range) reaches neither the
    # value nor, through torch.where's backward, the gradient.
    pred = torch.where(time_mask(lengths, pred, time_dim, "prediction"), pred, 0)
    padding = ignore_index if is_class_index and by_class else 0
    target = torch.where(time_mask(lengths, target, time_dim, "target"), target, padding)
    elementwise = unreduced(pred, target, *args[2:], **kwargs)
    keep = time_mask(lengths, elementwise, time_dim)
    counts = None
    if by_class and is_class_index:
        counts = class_weights(target, class_weight, ignore_index).to(elementwise.dtype)
    return masked_reduce(elementwise, keep, reduction, counts)
