"""Gradient norms, weight checks and scaling in multi-tensor (foreach) kernels.

Every number the pipeline decides on is computed here, so this is the one place
where a reduction over shards or ranks belongs. The arithmetic of
:func:`grad_stats` and :func:`scale_` is the same as
``torch.nn.utils.clip_grad_norm_`` (per device and dtype ``_foreach_norm``, a
stacked vector norm, one ``_foreach_mul_``), so a fixed clip through stableopt is
bit-identical to it.

Distributed runs. Every collective of the module goes through :func:`_sum_over_ranks`:

* Sharded gradients (FSDP2's ``DTensor``): ``torch._foreach_norm`` of a DTensor is a
  *partial* norm (``_NormPartial(2)``: each rank holds the norm of its shard), which
  ``clip_grad_norm_`` leaves for the caller to reduce (``total_norm.full_tensor()``).
  Here the local shards (``to_local()``) are normed with the same foreach kernels,
  squared, summed over the ranks of the mesh dimensions they are sharded on, and
  the square root taken: DTensor's own ``x**2 -> all_reduce(sum) -> x**0.5``, so the
  norm is bit-identical to ``clip_grad_norm_(...).full_tensor()``.
* The loss (each rank sees its own batch) is averaged over all ranks. Passed to
  :func:`grad_stats`, it rides in the same ``all_reduce`` as the squared gradient
  norm when the shards span all ranks (FSDP2 on one mesh): one collective of two
  numbers per step.
* The weight check (:func:`all_finite`) sums a local "bad" flag (a logical OR of
  non-finite shards), so a NaN in any rank's shard is seen by every rank.
* Flags that are themselves ``DTensor``\\ s (a unit-wise clip on sharded
  parameters) are made whole in :func:`read_host` before the host read.
* Plain tensors that are partitions of one model over a process group (DeepSpeed ZeRO
  hands the optimizer each rank's flat partition of the parameters, their gradients and
  state): inside :func:`partitioned`, every plain tensor counts as a shard over that
  group, exactly like a DTensor's local shard.

So every flag the host reads is computed from identical inputs on every rank and
every rank decides the same. Plain tensors (one process, DDP, whose gradients
arrive already all-reduced) take no collective except the loss mean, and the
single-process arithmetic is unchanged.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

__all__ = [
    "GradStats",
    "all_finite",
    "bad_params",
    "finite_flags",
    "grad_stats",
    "non_finite_params",
    "partitioned",
    "read_host",
    "scale_",
    "state_tensors",
]

#: Reduce over all ranks of the default process group.
_WORLD = "world"

#: The reduction key of plain tensors inside :func:`partitioned` (``None`` outside it).
_PARTITION: ContextVar[Any] = ContextVar("stableopt_partition", default=None)


@contextmanager
def partitioned(group: Any) -> Iterator[None]:
    """Treat every plain tensor as one rank's partition over ``group`` while inside.

    For optimizers driven by a partitioning wrapper (DeepSpeed ZeRO): each rank holds a
    disjoint slice of the parameters, gradients and state as plain tensors, so norms and
    finite flags are summed over ``group`` (a process group; ``None``: the default one),
    as for DTensor shards. Use it around the whole step, and check module buffers
    (replicated, not partitioned) inside :func:`replicated`.
    """
    key: Any = _WORLD
    if group is not None and dist.get_world_size(group) != dist.get_world_size():
        key = (group,)
    token = _PARTITION.set(key)
    try:
        yield
    finally:
        _PARTITION.reset(token)


@contextmanager
def replicated() -> Iterator[None]:
    """Plain tensors are whole again inside (module buffers within a partitioned step)."""
    token = _PARTITION.set(None)
    try:
        yield
    finally:
        _PARTITION.reset(token)


@dataclass(frozen=True)
class GradStats:
    """Statistics of one step's gradients, all 0-dim tensors on the first gradient's device.

    Attributes:
        grad_norm: total L2 norm of all gradients (pre-clip), over all shards.
        loss: the mean over ranks of the ``loss`` given to :func:`grad_stats`
            (``None`` when none was given).
        norm_stats: the growth of the model's normalisation statistics in the step's
            forward pass over its bound (:meth:`stableopt.buffers.ModelBuffers.norm_stats`;
            ``None``: not judged).
    """

    grad_norm: Tensor
    loss: Tensor | None = None
    norm_stats: Tensor | None = None


def _by_device_and_dtype(tensors: list[Tensor]) -> list[tuple[torch.device, list[Tensor]]]:
    grouped = _group_tensors_by_device_and_dtype([tensors])  # type: ignore[list-item]
    return [(device, cast(list[Tensor], group[0])) for (device, _), (group, _) in grouped.items()]


def _strided(tensor: Tensor) -> Tensor:
    """The values of a sparse tensor (coalesced: duplicates summed, as they count), else itself."""
    if tensor.layout == torch.sparse_coo:
        return tensor.coalesce().values()
    if tensor.layout != torch.strided:  # CSR, CSC, BSR, BSC: no duplicates
        return tensor.values()
    return tensor


def _group_norms(
    tensors: list[Tensor], ord: float, dtype: torch.dtype | None = None
) -> list[tuple[list[int], list[Tensor]]]:
    """Per device and dtype group (the order ``clip_grad_norm_`` uses): the indices of its
    tensors in ``tensors`` and their norms, by ``_foreach_norm`` where it applies."""
    strided = [_strided(t) for t in tensors]
    grouped = _group_tensors_by_device_and_dtype([strided], with_indices=True)  # type: ignore[list-item]
    out: list[tuple[list[int], list[Tensor]]] = []
    for (device, _), (group, indices) in grouped.items():
        members = cast(list[Tensor], group[0])
        if _has_foreach_support(members, device):
            norms = list(torch._foreach_norm(members, ord, dtype=dtype))
        else:
            norms = [torch.linalg.vector_norm(t, ord, dtype=dtype) for t in members]
        out.append((list(indices), norms))
    return out


def _norms(tensors: list[Tensor], ord: float, dtype: torch.dtype | None = None) -> list[Tensor]:
    """One norm per tensor, in group order: enough for a total (stacked as
    ``clip_grad_norm_`` stacks them, so the total is its bits)."""
    return [norm for _, norms in _group_norms(tensors, ord, dtype) for norm in norms]


def _norms_in_order(tensors: list[Tensor], ord: float) -> list[Tensor]:
    """One norm per tensor, in the order of ``tensors`` (for per-tensor flags)."""
    out: list[Tensor | None] = [None] * len(tensors)
    for indices, norms in _group_norms(tensors, ord):
        for index, norm in zip(indices, norms, strict=True):
            out[index] = norm
    return cast(list[Tensor], out)


def _to_device(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """``tensors`` on ``device``; a call per tensor only for those elsewhere (the values
    are the same either way: ``.to`` of a tensor already there returns it)."""
    return [t if t.device == device else t.to(device) for t in tensors]


def _stacked_norm(tensors: list[Tensor], device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``clip_grad_norm_``'s total norm: per-tensor foreach norms, stacked, normed."""
    norms = _norms(tensors, 2.0, dtype)
    return torch.linalg.vector_norm(torch.stack(_to_device(norms, device)), 2.0)


# -- distributed plumbing --------------------------------------------------------------


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _dtensor_type() -> type | None:
    """The DTensor class, once its module is loaded (no DTensor exists before; the lookup
    costs a dict read, where an import statement per tensor cost more than the check)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def _split_sharded(tensors: list[Tensor]) -> tuple[list[Tensor], dict[Any, list[Tensor]]]:
    """Plain tensors, and the local shards of DTensors keyed by the groups to reduce them over.

    The key is the tuple of process groups of the mesh dimensions a DTensor is
    sharded (or partial) on, or ``_WORLD`` when that is a single group spanning all
    ranks (FSDP2 on a 1-D mesh). A DTensor replicated everywhere counts as plain
    (its local tensor is the whole value, the same on every rank).
    """
    dtensor = _dtensor_type()
    partition = _PARTITION.get()
    plain: list[Tensor] = []
    sharded: dict[Any, list[Tensor]] = {}
    for tensor in tensors:
        if dtensor is None or not isinstance(tensor, dtensor):
            if partition is not None:
                sharded.setdefault(partition, []).append(tensor)
            else:
                plain.append(tensor)
            continue
        t: Any = tensor
        dims = [i for i, placement in enumerate(t.placements) if not placement.is_replicate()]
        local = t.to_local()
        if not dims:
            plain.append(local)
            continue
        groups = tuple(t.device_mesh.get_group(i) for i in dims)
        if len(groups) == 1 and dist.get_world_size(groups[0]) == dist.get_world_size():
            key: Any = _WORLD
        else:
            key = groups
        sharded.setdefault(key, []).append(local)
    return plain, sharded


def _sum_over_ranks(parts: list[tuple[Any, Tensor]]) -> list[Tensor]:
    """Sum each 0-dim tensor over the ranks of its key (``_WORLD`` or a tuple of groups).

    The only place this module communicates. All parts keyed ``_WORLD`` share one
    ``all_reduce`` (of a vector of that many numbers); a part sharded over a strict
    subset of the ranks (HSDP, 2-D meshes) takes one ``all_reduce`` per mesh
    dimension. Every rank passes the same keys in the same order (the same
    parameters, the same arguments), so every rank enters the same collectives.
    Without a process group, or with one rank, the values come back unchanged.
    """
    if not parts or _world_size() == 1:
        return [value for _, value in parts]
    buckets: dict[Any, list[int]] = {}
    for index, (key, _) in enumerate(parts):
        buckets.setdefault(key, []).append(index)
    out: list[Tensor | None] = [None] * len(parts)
    for key, indices in buckets.items():
        values = [parts[i][1] for i in indices]
        device = values[0].device
        dtype = values[0].dtype
        for value in values[1:]:
            dtype = torch.promote_types(dtype, value.dtype)
        packed = torch.stack([v.to(device, dtype).reshape(()) for v in values])
        for group in (None,) if key == _WORLD else key:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        for i, value in zip(indices, packed.unbind(0)):
            out[i] = value.to(parts[i][1].device, parts[i][1].dtype)
    return cast(list[Tensor], out)


# -- statistics ------------------------------------------------------------------------


def _norm_and_sum(
    tensors: list[Tensor], extra: Tensor | None, device: torch.device | None = None
) -> tuple[Tensor, Tensor | None]:
    """Global total norm of ``tensors`` and ``extra`` summed over all ranks, in one collective."""
    if not tensors:
        norm = torch.zeros((), device=device)
        return norm, None if extra is None else _sum_over_ranks([(_WORLD, extra)])[0]
    plain, sharded = _split_sharded(tensors)
    if not sharded:
        # One process or DDP: clip_grad_norm_'s arithmetic, no collective for the norm.
        first_device = plain[0].device
        norm = _stacked_norm(plain, first_device, None)
        return norm, None if extra is None else _sum_over_ranks([(_WORLD, extra)])[0]
    first_device = next(iter(sharded.values()))[0].device
    parts = [
        (key, _stacked_norm(local, first_device, None).square()) for key, local in sharded.items()
    ]
    if extra is not None:
        parts.append((_WORLD, extra))
    sums = _sum_over_ranks(parts)
    square = sums[0]
    for part in sums[1 : len(sharded)]:
        square = square + part
    if plain:  # replicated tensors beside the shards: the same on every rank
        square = square + _stacked_norm(plain, first_device, None).square()
    return square.sqrt(), None if extra is None else sums[-1]


@torch.no_grad()
def grad_stats(
    grads: list[Tensor], scale: Tensor | None = None, loss: Tensor | None = None
) -> GradStats:
    """Total norm of ``grads`` in one foreach pass (and at most one collective), and the loss mean.

    ``scale`` is a loss scale the gradients still carry (GradScaler's): the norm is
    divided by it, so policies see the unscaled norm without a pass to unscale.
    ``loss`` is this rank's loss (a 0-dim tensor); :attr:`GradStats.loss` is its mean
    over all ranks, reduced in the same ``all_reduce`` as the sharded gradients'
    norm (no second collective).
    """
    local_loss = None
    if loss is not None:
        local_loss = loss.detach() if loss.dim() == 0 else loss.detach().reshape(())
    grad_norm, loss_sum = _norm_and_sum(grads, local_loss)
    if scale is not None:
        grad_norm = grad_norm / scale.to(grad_norm.device, grad_norm.dtype)
    mean_loss = None
    if local_loss is not None and loss_sum is not None:
        world_size = _world_size()
        mean_loss = local_loss if world_size == 1 else loss_sum / world_size
    return GradStats(grad_norm=grad_norm, loss=mean_loss)


@torch.no_grad()
def finite_flags(tensors: list[Tensor]) -> Tensor:
    """1-D bool tensor, one flag per tensor: every value of it is finite (on every rank).

    Exact for every floating and complex dtype (integer and bool tensors are finite by
    construction and are not read). Off the CPU: one multi-tensor max-abs pass
    (``_foreach_norm`` of order ``inf``): the largest absolute value of finite numbers is
    finite, where a sum of squares of large ones need not be. On the CPU, where the max-abs
    kernel is 6-8x slower than the L2 one: one L2 pass (a finite L2 norm means every value
    is finite), and the max-abs pass only over the tensors whose L2 norm is not finite, to
    tell a NaN/Inf from a sum of squares that overflowed (reading a CPU number is no sync).
    Sparse tensors are read through their values. Parameters are detached first
    (``nn.Parameter`` is not a plain tensor to the multi-tensor kernels). For DTensors
    (FSDP2) each rank checks its local shards and the per-tensor "bad" flags are summed over
    the ranks holding shards (one ``all_reduce`` of one vector), so a NaN in any rank's
    shard flags that tensor on every rank.
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    # no DTensor exists before its module is loaded
    sharded = _dtensor_type() is not None or _PARTITION.get() is not None
    local = [_local_of(t.detach()) for t in tensors] if sharded else [t.detach() for t in tensors]
    device = local[0].device
    out = torch.ones(len(tensors), dtype=torch.bool, device=device)
    checked = [
        i
        for i, t in enumerate(local)
        if (t.is_floating_point() or t.is_complex())
        and (t.numel() > 0 if t.layout == torch.strided else _strided(t).numel() > 0)
    ]
    if checked:
        chosen = [local[i] for i in checked]
        if device.type == "cpu":
            finite = torch.isfinite(torch.stack(_norms_in_order(chosen, 2.0)))
            if not bool(finite.all()):  # NaN/Inf, or a sum of squares that overflowed
                suspects = [i for i, ok in enumerate(finite.tolist()) if not ok]
                maxima = _norms_in_order([chosen[i] for i in suspects], math.inf)
                finite[torch.tensor(suspects)] = torch.isfinite(torch.stack(maxima))
        else:
            maxima = _norms_in_order(chosen, math.inf)
            finite = torch.isfinite(torch.stack(_to_device(maxima, device)))
        if len(checked) == len(local):
            out = finite
        else:
            out[torch.tensor(checked, device=device)] = finite
    keys = {key for key in map(_reduction_key, tensors) if key is not None} if sharded else set()
    if not keys:
        return out
    bad = (~out).to(torch.float32)
    if _world_size() > 1:
        for group in (None,) if keys == {_WORLD} else _union_groups(keys):
            dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=group)
    return bad == 0


def state_tensors(optimizer: Any, param: Tensor) -> list[Tensor]:
    """The floating (and complex) tensors of ``param``'s optimizer state."""
    state = optimizer.state.get(param)
    if not state:
        return []
    return [
        value
        for value in state.values()
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())
    ]


def bad_params(
    flags: Tensor, owners: list[int], checked: list[Tensor], every: list[Tensor]
) -> tuple[int, ...]:
    """Indices into ``every`` of the parameters with a tensor whose flag is false (reads the
    flags: only on a step that found something). ``owners[i]`` is the index in ``checked``
    of the parameter tensor ``i`` belongs to."""
    position = {id(p): i for i, p in enumerate(every)}
    bad_tensors: list[int] = (~flags).nonzero().flatten().tolist()
    return tuple(sorted({position[id(checked[owners[i]])] for i in bad_tensors}))


def non_finite_params(optimizer: Any, params: list[Tensor]) -> tuple[int, ...]:
    """Indices of the ``params`` that, or whose optimizer state, hold a NaN or Inf (one
    max-abs pass; a read)."""
    tensors: list[Tensor] = []
    owners: list[int] = []
    for index, param in enumerate(params):
        for tensor in (param, *state_tensors(optimizer, param)):
            tensors.append(tensor)
            owners.append(index)
    flags = finite_flags(tensors)
    if bool(flags.all()):
        return ()
    return bad_params(flags, owners, params, params)


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool tensor: every value of every tensor is finite (see :func:`finite_flags`)."""
    return finite_flags(tensors).all()


def _local_of(tensor: Tensor) -> Tensor:
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return cast(Any, tensor).to_local()
    return tensor


def _reduction_key(tensor: Tensor) -> Any:
    """What a DTensor's local values, or a partition's, are summed over (``_WORLD`` or
    process groups), or ``None``."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return _PARTITION.get()
    t: Any = tensor
    dims = [i for i, placement in enumerate(t.placements) if not placement.is_replicate()]
    if not dims:
        return None
    groups = tuple(t.device_mesh.get_group(i) for i in dims)
    if len(groups) == 1 and dist.get_world_size(groups[0]) == dist.get_world_size():
        return _WORLD
    return groups


def _union_groups(keys: set[Any]) -> tuple[Any, ...]:
    """Every process group any key spans, each once (``None``: the default group)."""
    groups: dict[int, Any] = {}
    for key in keys:
        for group in (None,) if key == _WORLD else key:
            groups[id(group)] = group
    return tuple(groups.values())


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


def read_host(
    flags: dict[str, Tensor], numbers: dict[str, Tensor]
) -> tuple[dict[str, bool], dict[str, float]]:
    """Read a step's 0-dim device flags and numbers to the host in one transfer (one sync).

    Everything is stacked into one float64 vector (float32 on MPS, which has no
    float64) and read with one ``tolist()``: a float32 norm or loss is exact in it.
    A flag that is a ``DTensor`` (computed from sharded tensors, e.g. the unit-wise
    clip's "clipped" on FSDP2 parameters) is made whole first (``full_tensor()``, a
    collective), so the host reads the same value on every rank.
    """
    if not flags and not numbers:
        return {}, {}
    dtensor = _dtensor_type()
    values: list[Tensor] = []
    for flag in flags.values():
        if dtensor is not None and isinstance(flag, dtensor):
            flag = cast(Any, flag).to(torch.float32).full_tensor() != 0
        values.append(flag)
    values.extend(numbers.values())
    device = values[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    # Stack like with like, convert each stack once, and read one vector: a few
    # kernels however many values, and one transfer.
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, value in enumerate(values):
        groups.setdefault((value.device, value.dtype), []).append(index)
    order = [index for indices in groups.values() for index in indices]
    parts = [_as_vector([values[i] for i in indices], device, dtype) for indices in groups.values()]
    read = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
    host = [0.0] * len(values)
    for index, value in zip(order, read):
        host[index] = value
    return (
        {name: value != 0 for name, value in zip(flags, host)},
        dict(zip(numbers, host[len(flags) :])),
    )


def _as_vector(values: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Same-device, same-dtype 0-dim tensors as one ``dtype`` vector on ``device``."""
    vector = torch.stack([v if v.dim() == 0 else v.reshape(()) for v in values])
    if vector.dtype != dtype or vector.device != device:
        vector = vector.to(device, dtype)
    return vector
