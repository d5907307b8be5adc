"""Which dim of a prediction/target pair is time, and trimming a length mismatch along it.

Everything here reads ``.shape`` only: no value leaves the device.

A *layout* is what SafeLoss knows about the wrapped loss's arguments. Dim 0 is the batch.

- ``ELEMENTWISE``: the target has the prediction's shape (``nn.MSELoss``, ``nn.L1Loss``,
  ...). The default time dim is the last: ``(B, T)``, ``(B, n_mel, T)``.
- ``CLASSES``: the classes are at dim 1 of the prediction; the target is either class
  indices without that dim (``(B, C, *)`` against ``(B, *)``) or probabilities of the
  prediction's shape (``nn.CrossEntropyLoss``, ``nn.NLLLoss``). The default time dim is
  the last, when it is neither the batch nor the class dim.
- ``None``: an arbitrary callable. There is no default time dim: a shape difference it
  cannot place is an error, and a rank difference is the loss's own business.

A time dim is kept as a negative index (counted from the end). In both known layouts it
is then the same dim of the prediction, of the target and of the elementwise loss, since
the only dim the target may lack is the class dim 1, in front of every time dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLASSES", "ELEMENTWISE", "ON_MISMATCH", "Aligned", "Mismatch", "align", "layout_of"]

#: The accepted values of ``on_mismatch``.
ON_MISMATCH = ("trim", "expected", "error", "ignore")

ELEMENTWISE = "elementwise"
CLASSES = "classes"

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCEWithLogitsLoss,
    nn.BCELoss,
)
_CLASS_MODULES: tuple[type[nn.Module], ...] = (nn.CrossEntropyLoss, nn.NLLLoss)
_ELEMENTWISE_FUNCTIONS: tuple[Callable[..., Tensor], ...] = (
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.binary_cross_entropy_with_logits,
    F.binary_cross_entropy,
)
_CLASS_FUNCTIONS: tuple[Callable[..., Tensor], ...] = (F.cross_entropy, F.nll_loss)

_IGNORE_HINT = (
    "; for a loss with its own shape contract (broadcasting, CTCLoss) on_mismatch='ignore' "
    "passes any shapes through"
)


def layout_of(loss: Callable[..., Any]) -> str | None:
    """The layout of ``loss``'s arguments, ``None`` if SafeLoss cannot know it.

    A subclass of a known loss module is known only if it keeps that module's
    ``forward``: an overridden ``forward`` may read its arguments differently.
    """
    known = (
        (ELEMENTWISE, _ELEMENTWISE_MODULES, _ELEMENTWISE_FUNCTIONS),
        (CLASSES, _CLASS_MODULES, _CLASS_FUNCTIONS),
    )
    for layout, modules, functions in known:
        if any(loss is function for function in functions):
            return layout
        for module in modules:
            if isinstance(loss, module) and type(loss).forward is module.forward:
                return layout
    return None


class Mismatch(NamedTuple):
    """Prediction and target differed in the time dim and were trimmed."""

    dim: int  # the prediction's dim, counted from the front
    pred_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    pred_length: int
    target_length: int


class Aligned(NamedTuple):
    """The (possibly trimmed) pair, and what masking needs to know about it.

    ``time_dim`` is negative, ``None`` where there is none; ``steps`` is the longer
    of the two time lengths before trimming (the bound on ``lengths``).
    """

    pred: Tensor
    target: Tensor
    time_dim: int | None
    steps: int | None
    mismatch: Mismatch | None


def align(
    pred: Tensor,
    target: Tensor,
    *,
    layout: str | None,
    time_dim: int | None,
    on_mismatch: str,
    masking: bool,
    name: str,
) -> Aligned:
    """Check the shapes of ``pred`` and ``target`` against ``layout``; trim the time dim.

    A pair whose shapes the layout accepts as they are is returned untouched. A
    difference in the time dim only (``time_dim``, or the layout's default) is cut
    to the shorter length (``"trim"``) or raises (``"error"``). Every other
    difference raises ``ValueError`` naming both shapes and the fix. ``"ignore"``
    checks nothing. ``masking``: the caller will mask with ``lengths``, so the time
    dim must be found in the target too (for an unknown loss whose target has one
    dim fewer, by the class-dim-1 convention of ``CrossEntropyLoss``, and only with
    an explicit ``time_dim``).
    """
    shapes = f"prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)}"
    class_dim = _class_dim(pred, target, layout, masking)
    rank_fits = pred.ndim == target.ndim or (class_dim is not None and pred.ndim == target.ndim + 1)
    if not rank_fits:
        if layout is None and not masking:
            return Aligned(pred, target, None, None, None)  # the loss's own business
        if on_mismatch == "ignore":
            return Aligned(pred, target, _time_dim(pred, time_dim, layout, class_dim), None, None)
        accepted = {
            ELEMENTWISE: "a target of the prediction's shape",
            CLASSES: "a target of the prediction's shape (probabilities) or without its class "
            "dim 1 (class indices)",
            None: "a target of the prediction's rank, or one dim fewer with an explicit time_dim "
            "and the classes at dim 1 of the prediction",
        }[layout]
        what = f"{name} takes" if layout is not None else "masking with lengths= needs"
        raise ValueError(
            f"{shapes} have ranks {pred.ndim} and {target.ndim}: {what} {accepted}{_IGNORE_HINT}"
        )
    time = _time_dim(pred, time_dim, layout, class_dim)
    pred_dims = [d for d in range(pred.ndim) if not (d == class_dim and pred.ndim > target.ndim)]
    if on_mismatch == "ignore":
        return Aligned(pred, target, _negative(pred, time), _steps(pred, target, time), None)
    differing = [
        (p, t) for t, p in enumerate(pred_dims) if int(pred.shape[p]) != int(target.shape[t])
    ]
    if not differing:
        return Aligned(pred, target, _negative(pred, time), _steps(pred, target, time), None)
    if layout is None and pred.ndim != target.ndim:
        # Only here for masking: the time dim was placed by convention, so its
        # lengths must agree; no other dim is compared by a loss SafeLoss does not know.
        if time is not None and time in [p for p, _ in differing]:
            raise ValueError(
                f"{shapes}: dim {time} of the prediction (time_dim={time_dim}) and dim "
                f"{time - 1} of the target differ; with a target of one dim fewer, SafeLoss "
                "neither trims nor masks a loss whose layout it does not know unless the time "
                "dims agree (the classes at dim 1 of the prediction, as in CrossEntropyLoss)"
            )
        return Aligned(pred, target, _negative(pred, time), _steps(pred, target, time), None)
    dims = [p for p, _ in differing]
    if dims[0] == 0 and class_dim != 0:
        raise ValueError(f"{shapes} have different batch sizes (dim 0){_IGNORE_HINT}")
    if class_dim is not None and class_dim in dims:
        raise ValueError(
            f"{shapes} differ in the class dim {class_dim}, which is never trimmed{_IGNORE_HINT}"
        )
    if len(dims) > 1:
        raise ValueError(
            f"{shapes} differ in {len(dims)} dims {dims}; only a length mismatch in the time "
            f"dim can be trimmed{_IGNORE_HINT}"
        )
    pred_dim, target_dim = differing[0]
    if time != pred_dim:
        raise ValueError(_placement_error(shapes, pred, pred_dim, time_dim, layout, name))
    if layout == CLASSES and time_dim is None and tuple(target.shape) == tuple(pred.shape[:-1]):
        raise ValueError(
            f"{shapes}: {name} reads the prediction as (B, C, ...) with {pred.shape[1]} classes "
            f"at dim 1, but the target matches the prediction without its last dim, as logits "
            f"laid out (B, ..., C) would; pass logits.movedim(-1, 1) to put the classes at dim 1, "
            f"or, if dim 1 really holds the classes, time_dim=-1 to trim the time dim"
        )
    if on_mismatch == "error":
        raise ValueError(f"{shapes} differ in dim {pred_dim} (on_mismatch='error')")
    pred_length, target_length = int(pred.shape[pred_dim]), int(target.shape[target_dim])
    length = min(pred_length, target_length)
    mismatch = Mismatch(
        pred_dim, tuple(pred.shape), tuple(target.shape), pred_length, target_length
    )
    return Aligned(
        pred.narrow(pred_dim, 0, length),
        target.narrow(target_dim, 0, length),
        pred_dim - pred.ndim,
        max(pred_length, target_length),
        mismatch,
    )


def _class_dim(pred: Tensor, target: Tensor, layout: str | None, masking: bool) -> int | None:
    """The class dim of the prediction, ``None`` if the layout has none."""
    if layout == CLASSES:
        return 1 if pred.ndim >= 2 else 0
    if layout is None and masking and pred.ndim == target.ndim + 1 and pred.ndim >= 2:
        return 1  # the convention for a loss SafeLoss does not know
    return None


def _time_dim(
    pred: Tensor, time_dim: int | None, layout: str | None, class_dim: int | None
) -> int | None:
    """``time_dim``, or the layout's default, as an index into the prediction from the front."""
    if time_dim is None:
        last = pred.ndim - 1
        if layout is None or last < 1 or last == class_dim:
            return None
        return last
    if not -pred.ndim <= time_dim < pred.ndim:
        raise ValueError(
            f"time_dim={time_dim} is out of range for a prediction of shape {tuple(pred.shape)}"
        )
    index = time_dim % pred.ndim
    if index == class_dim:
        why = "" if layout == CLASSES else " (a target of one dim fewer: the classes at dim 1)"
        raise ValueError(
            f"time_dim={time_dim} is the class dim of a prediction of shape "
            f"{tuple(pred.shape)}{why}"
        )
    if index == 0:
        raise ValueError(
            f"time_dim={time_dim} is the batch dim of a prediction of shape {tuple(pred.shape)}"
        )
    return index


def _negative(pred: Tensor, time: int | None) -> int | None:
    return None if time is None else time - pred.ndim


def _steps(pred: Tensor, target: Tensor, time: int | None) -> int | None:
    """The longer time length of the two (the target's time dim: the same from the end)."""
    if time is None:
        return None
    position = target.ndim + time - pred.ndim
    other = int(target.shape[position]) if position >= 0 else 0
    return max(int(pred.shape[time]), other)


def _placement_error(
    shapes: str,
    pred: Tensor,
    dim: int,
    time_dim: int | None,
    layout: str | None,
    name: str,
) -> str:
    """Why a one-dim difference outside the time dim is not trimmed, and the fix."""
    fix = f"pass time_dim={dim} (or {dim - pred.ndim}) if dim {dim} is the time dim, else fix the shapes"
    if layout is None and time_dim is None:
        return (
            f"{shapes} differ in dim {dim}; SafeLoss does not know the layout of {name}, so it "
            f"does not guess which dim is time: {fix}{_IGNORE_HINT}"
        )
    where = (
        f"time_dim={time_dim}" if time_dim is not None else f"the last dim, the default for {name}"
    )
    return (
        f"{shapes} differ in dim {dim}, not in the time dim ({where}): only the time dim may "
        f"differ in length; {fix}{_IGNORE_HINT}"
    )
