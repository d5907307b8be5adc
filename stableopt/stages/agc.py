"""Unit-wise adaptive gradient clipping (AGC), the clip policy of NFNets.

Unlike the total-norm policies of :mod:`stableopt.stages.clip`, AGC rescales each
output unit's gradient on its own, so it clips the gradients in place
(:meth:`AGCClip.clip_in_place`) and sets no total-norm limit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor
from torch.utils._foreach_utils import _has_foreach_support

from stableopt._checks import check_float
from stableopt._num import Num
from stableopt.stages.base import ClipPolicy

__all__ = ["AGCClip", "unitwise_norm"]

log = logging.getLogger(__name__)

#: Floor of a unit's gradient norm before dividing by it (timm's ``adaptive_clip_grad``).
_GRAD_NORM_FLOOR = 1e-6

_FINAL_LAYER = "final_layer"


def unitwise_norm(stacked: Tensor, unit_ndim: int) -> Tensor:
    """L2 norm of each unit of ``k`` stacked tensors of ``unit_ndim`` dims (shape ``(k, *shape)``).

    A unit is a row of the first (output) dim for tensors of 2 or more dims (a
    linear layer's output neuron, a convolution's output channel); a tensor of 0 or
    1 dims (a bias, a gain) is one unit. The result broadcasts against ``stacked``:
    ``(k, out, 1, ..., 1)`` or ``(k,)``.
    """
    k = stacked.shape[0]
    if unit_ndim <= 1:
        return torch.linalg.vector_norm(stacked.reshape(k, -1), dim=1)
    rows = stacked.reshape(k, stacked.shape[1], -1)
    norms = torch.linalg.vector_norm(rows, dim=2)
    return norms.view(k, stacked.shape[1], *([1] * (unit_ndim - 1)))


class AGCClip(ClipPolicy):
    """AGC: clip each unit's gradient to a fraction of its weights' norm.

    Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
    Without Normalization", 2021 (NFNets); the shape of timm's
    ``timm/utils/agc.py``. For every unit ``i`` (a row of the output dim, or the
    whole tensor for biases and other tensors of at most one dim)::

        max_i = clip_factor * max(||W_i||, eps)
        G_i  <- G_i * max_i / max(||G_i||, 1e-6)    where ||G_i|| >= max_i, else unchanged

    The gradients are scaled in place in :meth:`clip_in_place`, which returns
    whether any unit was over its limit (a 0-dim bool tensor); :meth:`max_norm` is
    ``inf`` (no total-norm limit). There is no history and no host sync.

    The paper does not clip the final (classifier) layer. With
    ``exclude="final_layer"`` the heuristic is: among the parameters with gradients,
    in the order the optimizer lists them (``model.parameters()`` order for the usual
    ``Optimizer(model.parameters())``), the last one with 2 or more dims is the head's
    weight, and the parameter right after it is its bias when it has one dim of the
    head's output size (timm's training script drops the last two parameters the same
    way). Tied heads or heads listed elsewhere (say, biases in a separate no-decay
    group) need an explicit ``exclude``.

    Cost per step: parameters are grouped once by (shape, dtype, device); per group,
    the weights and the gradients are stacked into temporaries (one extra read of
    each; peak extra memory is the largest group's weights plus gradients), two norm
    reductions, and one in-place multi-tensor multiply of the gradients. The number
    of kernels grows with the number of distinct shapes, not with depth.

    Args:
        clip_factor: the ratio ``lambda`` of gradient to weight norm allowed (default
            0.01, the paper's for batch size 4096, ``> 0``; the paper uses larger values
            for smaller batches).
        eps: floor of a unit's weight norm, so that zero-initialised weights can move
            (default 1e-3, the paper's, ``> 0``).
        exclude: parameters never clipped, matched by identity: an iterable of
            tensors (or one tensor), ``"final_layer"`` (default: the heuristic
            above) or ``None`` (clip every parameter).
    """

    name = "agc"
    clips_in_place = True

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude: Iterable[Tensor] | Tensor | Literal["final_layer"] | None = "final_layer",
    ) -> None:
        self.clip_factor = check_float("clip_factor", clip_factor, minimum=0.0, inclusive_min=False)
        self.eps = check_float("eps", eps, minimum=0.0, inclusive_min=False)
        self.excludes_final_layer = False
        self.exclude: tuple[Tensor, ...] = ()
        if isinstance(exclude, str):
            if exclude != _FINAL_LAYER:
                raise ValueError(
                    f"exclude must be an iterable of parameter tensors, {_FINAL_LAYER!r} or None, "
                    f"got {exclude!r}"
                )
            self.excludes_final_layer = True
        elif isinstance(exclude, Tensor):
            self.exclude = (exclude,)
        elif exclude is not None:
            if not isinstance(exclude, Iterable):
                raise TypeError(
                    "exclude must be an iterable of parameter tensors, 'final_layer' or None, "
                    f"got {type(exclude).__name__}"
                )
            self.exclude = tuple(exclude)
            for item in self.exclude:
                if not isinstance(item, Tensor):
                    raise TypeError(
                        "exclude must be an iterable of parameter tensors, 'final_layer' or None, "
                        f"got an item of type {type(item).__name__}"
                    )
        # The grouping of the last parameter list seen: (ids of the params, index groups).
        self._plan: tuple[tuple[int, ...], list[list[int]]] | None = None

    def max_norm(self, grad_norm: Num) -> float:
        """No total-norm limit: ``inf`` (the clipping is unit-wise, in :meth:`clip_in_place`)."""
        return math.inf

    @torch.no_grad()
    def clip_in_place(self, grads: list[Tensor], params: list[Tensor]) -> Tensor:
        """Clip ``grads`` in place unit by unit; return whether any unit was over its limit."""
        device = grads[0].device if grads else torch.device("cpu")
        is_over: list[Tensor] = []
        for indices in self._groups(params):
            group_params = [params[i].detach() for i in indices]
            group_grads = [grads[i] for i in indices]
            unit_ndim = group_params[0].ndim
            max_norms = unitwise_norm(_stack(group_params), unit_ndim).clamp(min=self.eps)
            max_norms = max_norms * self.clip_factor
            grad_norms = unitwise_norm(_stack(group_grads), unit_ndim)
            ratio = max_norms / grad_norms.clamp(min=_GRAD_NORM_FLOOR)
            # Scale by exactly 1 where under the limit: those units keep their bits.
            factors = torch.where(grad_norms < max_norms, 1.0, ratio)
            _mul_(group_grads, list(factors.unbind(0)))
            is_over.append((grad_norms > max_norms).any().to(device))
        if not is_over:
            return torch.zeros((), dtype=torch.bool, device=device)
        return torch.stack(is_over).any()

    def _groups(self, params: list[Tensor]) -> list[list[int]]:
        """Indices of the clipped parameters, grouped by (shape, dtype, device); cached."""
        key = tuple(id(p) for p in params)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        excluded = {id(p) for p in self.exclude} | self._final_layer_ids(params)
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, p in enumerate(params):
            if id(p) not in excluded:
                groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
        self._plan = (key, list(groups.values()))
        log.debug(
            "AGCClip: %d of %d parameters clipped in %d shape groups",
            sum(map(len, groups.values())),
            len(params),
            len(groups),
        )
        return self._plan[1]

    def _final_layer_ids(self, params: list[Tensor]) -> set[int]:
        if not self.excludes_final_layer:
            return set()
        matrices = [i for i, p in enumerate(params) if p.ndim >= 2]
        if not matrices:
            return set()
        head = matrices[-1]
        ids = {id(params[head])}
        if head + 1 < len(params):
            after = params[head + 1]
            if after.ndim == 1 and after.shape[0] == params[head].shape[0]:
                ids.add(id(after))
        return ids

    def __repr__(self) -> str:
        if self.excludes_final_layer:
            exclude = repr(_FINAL_LAYER)
        else:
            exclude = f"<{len(self.exclude)} tensors>" if self.exclude else "None"
        return f"AGCClip(clip_factor={self.clip_factor:g}, eps={self.eps:g}, exclude={exclude})"


def _stack(tensors: list[Tensor]) -> Tensor:
    # A single tensor needs no copy.
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _mul_(tensors: list[Tensor], factors: list[Tensor]) -> None:
    """``tensors[i] *= factors[i]`` (broadcasting), in one multi-tensor kernel where supported."""
    if _has_foreach_support(tensors, tensors[0].device):
        torch._foreach_mul_(tensors, factors)
    else:
        for tensor, factor in zip(tensors, factors):
            tensor.mul_(factor)
