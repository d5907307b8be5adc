"""Gradient and weight statistics in multi-tensor (foreach) kernels.

Every number the pipeline decides on is computed here, so this is the one place
where a reduction over shards or ranks belongs. The arithmetic of
:func:`total_norm` and :func:`scale_` is the same as
``torch.nn.utils.clip_grad_norm_`` (per device and dtype ``_foreach_norm``, a
stacked vector norm, one ``_foreach_mul_``), so a fixed clip through stableopt is
bit-identical to it.

Sharded gradients (FSDP2's ``DTensor``): ``torch._foreach_norm`` of a DTensor is a
*partial* norm (``_NormPartial(2)``: each rank holds the norm of its shard), which
``clip_grad_norm_`` leaves for the caller to reduce (``total_norm.full_tensor()``).
Here the reduction happens in one place, :func:`_global_sum_of_squares`: the local
shards (``to_local()``) are normed with the same foreach kernels, squared, summed,
all-reduced (``SUM``) over the mesh dimensions the tensors are sharded on, and the
square root taken: exactly DTensor's ``x**2 -> all_reduce(sum) -> x**0.5``. So the
norm, the finite flag derived from it and :func:`all_finite` are global, and every
rank reads the same flags. Plain tensors (one process, DDP) take no collective and
the arithmetic is unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

__all__ = [
    "GradStats",
    "all_finite",
    "grad_stats",
    "read_flags",
    "reduce_across_ranks",
    "scale_",
    "total_norm",
]


class GradStats(NamedTuple):
    """Statistics of one step's gradients, all 0-dim tensors on the first gradient's device.

    Attributes:
        grad_norm: total L2 norm of all gradients (pre-clip).
        is_finite: ``True`` when every gradient value is finite. Derived from the norm
            (a NaN or Inf anywhere makes the norm non-finite), so it costs no extra pass;
            a finite gradient whose norm overflows the dtype also counts as non-finite.
    """

    grad_norm: Tensor
    is_finite: Tensor


def _by_device_and_dtype(tensors: list[Tensor]) -> list[tuple[torch.device, list[Tensor]]]:
    grouped = _group_tensors_by_device_and_dtype([tensors])  # type: ignore[list-item]
    return [(device, cast(list[Tensor], group[0])) for (device, _), (group, _) in grouped.items()]


def _norms(tensors: list[Tensor], ord: float, dtype: torch.dtype | None = None) -> list[Tensor]:
    norms: list[Tensor] = []
    for device, group in _by_device_and_dtype(tensors):
        if _has_foreach_support(group, device):
            norms.extend(torch._foreach_norm(group, ord, dtype=dtype))
        else:
            norms.extend(torch.linalg.vector_norm(t, ord, dtype=dtype) for t in group)
    return norms


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed tensors
        return None
    return DTensor


def _split_sharded(tensors: list[Tensor]) -> tuple[list[Tensor], dict[Any, list[Tensor]]]:
    """Plain tensors, and the local shards of DTensors keyed by how to reduce them.

    The key is the tuple of process groups of the mesh dimensions a DTensor is
    sharded (or partial) on; a DTensor replicated everywhere counts as plain.
    """
    dtensor = _dtensor_type()
    plain: list[Tensor] = []
    sharded: dict[Any, list[Tensor]] = {}
    for tensor in tensors:
        if dtensor is None or not isinstance(tensor, dtensor):
            plain.append(tensor)
            continue
        t: Any = tensor
        mesh = t.device_mesh
        dims = tuple(i for i, pl in enumerate(t.placements) if not pl.is_replicate())
        local = t.to_local()
        if not dims:
            plain.append(local)
        else:
            groups = tuple(mesh.get_group(i) for i in dims)
            sharded.setdefault(groups, []).append(local)
    return plain, sharded


def _stacked_norm(tensors: list[Tensor], device: torch.device, dtype: torch.dtype | None) -> Tensor:
    norms = _norms(tensors, 2.0, dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)


def _global_sum_of_squares(
    sharded: dict[Any, list[Tensor]], device: torch.device, dtype: torch.dtype | None
) -> Tensor:
    """Sum over ranks of the squared norms of local shards: the one collective of a step.

    One ``all_reduce`` per distinct set of shard groups (FSDP2 on one mesh: exactly one,
    of a single scalar). Every rank holds the same DTensor parameters, so every rank
    enters the same collectives in the same order.
    """
    total: Tensor | None = None
    for groups, locals_ in sharded.items():
        square = _stacked_norm(locals_, device, dtype).square()
        for group in groups:
            dist.all_reduce(square, op=dist.ReduceOp.SUM, group=group)
        total = square if total is None else total + square
    assert total is not None
    return total


@torch.no_grad()
def total_norm(tensors: list[Tensor], device: torch.device | None = None) -> Tensor:
    """Total L2 norm of ``tensors``, computed exactly as ``clip_grad_norm_`` does.

    DTensor shards are reduced across ranks (see the module docstring): the result
    is the global norm, a plain tensor, the same on every rank.
    """
    if not tensors:
        return torch.zeros((), device=device)
    plain, sharded = _split_sharded(tensors)
    if not sharded:
        first_device = tensors[0].device
        norms = _norms(tensors, 2.0)
        return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), 2.0)
    first_device = next(iter(sharded.values()))[0].device
    square = _global_sum_of_squares(sharded, first_device, None)
    if plain:
        square = square + _stacked_norm(plain, first_device, None).square()
    return square.sqrt()


@torch.no_grad()
def grad_stats(grads: list[Tensor], scale: Tensor | None = None) -> GradStats:
    """Total norm and finite flag of ``grads`` in one foreach pass.

    ``scale`` is a loss scale the gradients still carry (GradScaler's): the norm is
    divided by it, so policies see the unscaled norm without a pass to unscale.
    """
    grad_norm = total_norm(grads)
    if scale is not None:
        grad_norm = grad_norm / scale.to(grad_norm.device, grad_norm.dtype)
    return GradStats(grad_norm=grad_norm, is_finite=torch.isfinite(grad_norm))


@torch.no_grad()
def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool tensor: every value of every tensor is finite (on every rank).

    One foreach L2-norm pass accumulated in float32 (a NaN or Inf anywhere makes a
    norm non-finite). Parameters are detached first: ``nn.Parameter`` is not a
    plain tensor, and torch's multi-tensor kernels refuse it. For DTensors (FSDP2)
    the local shards are checked and the sum of squared norms is all-reduced, so a
    NaN in any rank's shard makes the result ``False`` on every rank (an AND).
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    plain, sharded = _split_sharded([t.detach() for t in tensors])
    if sharded:
        first_device = next(iter(sharded.values()))[0].device
        square = _global_sum_of_squares(sharded, first_device, torch.float32)
        if plain:
            square = square + _stacked_norm(plain, first_device, torch.float32).square()
        return torch.isfinite(square)
    first_device = tensors[0].device
    norms: list[Tensor] = []
    for device, group in _by_device_and_dtype(plain):
        if _has_foreach_support(group, device):
            norms.extend(torch._foreach_norm(group, 2.0, dtype=torch.float32))
        else:
            norms.extend(torch.linalg.vector_norm(t, 2.0, dtype=torch.float32) for t in group)
    return torch.isfinite(torch.stack([n.to(first_device) for n in norms]).sum())


@torch.no_grad()
def scale_(tensors: list[Tensor], factor: Tensor) -> None:
    """Multiply every tensor in place by the 0-dim tensor ``factor`` (no host sync).

    DTensors are scaled through their local shards (no communication).
    """
    dtensor = _dtensor_type()
    if dtensor is not None:
        tensors = [cast(Any, t).to_local() if isinstance(t, dtensor) else t for t in tensors]
    for device, group in _by_device_and_dtype(tensors):
        device_factor = factor.to(device)
        if _has_foreach_support(group, device):
            torch._foreach_mul_(group, device_factor)
        else:
            for t in group:
                t.mul_(device_factor)


def read_flags(flags: dict[str, Tensor]) -> dict[str, bool]:
    """Read a set of 0-dim device flags to the host in one transfer (one sync)."""
    if not flags:
        return {}
    device = next(iter(flags.values())).device
    values = torch.stack(
        [flag.to(device, torch.bool).reshape(()) for flag in flags.values()]
    ).tolist()
    return dict(zip(flags, (bool(v) for v in values)))


def reduce_across_ranks(value: Tensor) -> Tensor:
    """Mean of ``value`` over all ranks of the default process group (identity without one).

    Every decision that reads a per-rank number (the loss: each rank sees its own
    batch) reads it through here, so all ranks decide the same.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return value
    reduced = value.detach().clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return reduced / world_size
