"""Snapshots of the parameters and the inner optimizer state, and restoring them.

A snapshot is taken of a state already verified to be finite, every
``every_steps`` good steps, into buffers allocated once and reused. Restoring
copies the values back into the same tensor objects (parameters, and optimizer
state tensors where their shape still matches), so nothing that holds a
reference to them goes stale.

The model's buffers (BatchNorm running statistics and the like, see
:mod:`stableopt.buffers`) are copied and restored with the weights when the pipeline
hands them over.

Memory: one copy of every parameter plus every tensor of the inner optimizer's
state (and of the model's buffers), on ``device`` (``"cpu"``, the default, costs no accelerator memory;
``"same"`` keeps it beside the parameters for faster snapshots). For AdamW
that is 3x the parameter bytes (weights, ``exp_avg``, ``exp_avg_sq``).

Sharded parameters (FSDP2's ``DTensor``): every rank copies and restores only its
local shard (``to_local()``), so a snapshot costs 3x the *shard* bytes per rank and
takes no communication. The pipeline decides to take or restore on every rank
together (its flags are global), so the shards always belong to the same step.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from stableopt._checks import check_choice, check_int
from stableopt.grad_norms import non_finite_params
from stableopt.stages.base import StepNumbers

__all__ = ["Rollback"]

log = logging.getLogger(__name__)

_DEVICES = ("cpu", "same")
_SCOPES = ("entries", "corrupted", "all")


class Rollback:
    """Keep a last-good snapshot and restore it when a step corrupts the weights.

    Args:
        every_steps: take a snapshot after every ``every_steps``-th good step
            (default 100; ``>= 1``). A rollback loses at most this many steps.
        device: ``"cpu"`` (default; pinned host memory when the parameters are on
            CUDA, copies are non-blocking) or ``"same"`` (beside each parameter).
        scope: what a rollback for non-finite weights restores: ``"entries"`` (default:
            only the NaN/Inf entries of the parameters and optimizer state that hold one,
            each from the snapshot; every finite value keeps its current, good value),
            ``"corrupted"`` (those parameters whole, with their whole state) or ``"all"``
            (every parameter and all state, back to the snapshot). A rollback because
            steps keep failing, or because the LR is too hot, always restores everything.
            Measured on the stability benchmark's ``nan_weights`` scenario (a NaN written
            into one weight on 1% of steps; median of 3 seeds, loss / fault-free): MLP
            0.999 with ``"entries"``, 1.60 with ``"corrupted"``, 4.1 with ``"all"``; the
            small LM 1.000, 1.001, 1.02.
        in_state_dict: include the snapshot in ``state_dict()`` (default
            ``False``). Without it, a checkpoint stays the size of the inner
            optimizer's and the loaded state becomes the snapshot; with it, a
            rollback after resuming lands on exactly the snapshot an
            uninterrupted run would use.
    """

    name = "rollback"

    def __init__(
        self,
        every_steps: int = 100,
        device: str = "cpu",
        in_state_dict: bool = False,
        scope: str = "entries",
    ) -> None:
        self.scope = check_choice("scope", scope, _SCOPES)
        self.every_steps = check_int("every_steps", every_steps, minimum=1)
        self.device = check_choice("device", device, _DEVICES)
        if not isinstance(in_state_dict, bool):
            raise TypeError(f"in_state_dict must be a bool, got {in_state_dict!r}")
        self.in_state_dict = in_state_dict
        self.snapshot_step: int | None = None
        self._bound_count: int | None = None  # parameters of the optimizer, once seen
        self._params: list[Tensor] = []
        self._state: list[dict[str, Any] | None] = []
        self._buffers: list[Tensor] = []

    @property
    def has_snapshot(self) -> bool:
        """Whether a snapshot exists to restore."""
        return self.snapshot_step is not None

    def is_due(self, good_steps: int) -> bool:
        """Whether the state after ``good_steps`` good steps should be snapshotted."""
        return good_steps % self.every_steps == 0

    def invalidate(self) -> None:
        """Forget the snapshot (the parameter set or the state changed under it)."""
        self.snapshot_step = None

    @torch.no_grad()
    def take(
        self,
        optimizer: Optimizer,
        step: int,
        verified: bool = False,
        buffers: Sequence[Tensor] = (),
    ) -> tuple[int, ...]:
        """Copy every parameter and its optimizer state (and ``buffers``, the model's)
        into the snapshot buffers, once they are verified finite; return the indices of the
        parameters that are not (then nothing is taken and the old snapshot stays).

        The verification is one multi-tensor max-abs pass over the parameters and their
        state (exact for every dtype), so a snapshot never holds a non-finite weight and a
        rollback never restores one; ``verified=True`` skips it when the caller has just
        checked every parameter and its state. ``buffers`` are the caller's to verify.
        """
        params = _all_params(optimizer)
        self._bound_count = len(params)
        bad = () if verified else non_finite_params(optimizer, params)
        if bad:
            return bad
        if len(self._params) != len(params):
            self._params, self._state = [], [None] * len(params)
        self._params = [
            self._copy_into(self._params[i] if self._params else None, p)
            for i, p in enumerate(params)
        ]
        self._state = [
            self._copy_state(self._state[i], optimizer.state.get(p)) for i, p in enumerate(params)
        ]
        if len(self._buffers) != len(buffers):
            self._buffers = []
        self._buffers = [
            self._copy_into(self._buffers[i] if self._buffers else None, b)
            for i, b in enumerate(buffers)
        ]
        self.snapshot_step = step
        return ()

    @torch.no_grad()
    def restore(
        self,
        optimizer: Optimizer,
        only: Collection[int] | None = None,
        entries: bool = False,
        buffers: Sequence[Tensor] = (),
    ) -> None:
        """Copy the snapshot back into the parameters and the optimizer state: all of them
        (and into ``buffers``, the model's, when the snapshot holds as many), or the
        parameters ``only`` names (indices in ``param_groups`` order) and their state; with
        ``entries=True`` only their non-finite entries (every finite value stays). Parameters
        of groups added after the snapshot (``add_param_group``) are not in it and stay."""
        if self.snapshot_step is None:
            raise RuntimeError("no snapshot to restore")
        params = _all_params(optimizer)
        if len(params) < len(self._params) or (only and max(only) >= len(self._params)):
            raise RuntimeError("the parameter set changed since the snapshot was taken")
        params = params[: len(self._params)]  # groups added since (add_param_group) stay
        if only is None and len(buffers) == len(self._buffers):
            for live, saved in zip(buffers, self._buffers):
                if live.shape == saved.shape and live.dtype == saved.dtype:
                    live.detach().copy_(saved, non_blocking=True)
        chosen = range(len(params)) if only is None else sorted(set(only))
        if entries and only is not None:
            for i in chosen:
                self._restore_entries(optimizer, params[i], i)
            return
        for i in chosen:
            _local(params[i]).copy_(self._params[i], non_blocking=True)
        for i in chosen:
            p, saved_state = params[i], self._state[i]
            if saved_state is None:
                optimizer.state.pop(p, None)
                continue
            live = optimizer.state[p]
            for key in [k for k in live if k not in saved_state]:
                del live[key]
            for key, value in saved_state.items():
                live[key] = _restore_value(live.get(key), value, p)

    def restore_corrupted(
        self, optimizer: Optimizer, only: Collection[int], buffers: Sequence[Tensor] = ()
    ) -> tuple[str, int]:
        """Restore what the parameters ``only`` hold of NaN/Inf, as :attr:`scope` says:
        their non-finite entries (``"entries"``), those parameters whole (``"corrupted"``) or
        everything, ``buffers`` included (``"all"``); return the scope applied and, for
        ``"entries"``, how many entries were restored (weights and state; else 0)."""
        if self.scope == "all" or not only:
            self.restore(optimizer, buffers=buffers)
            return "all", 0
        if self.scope == "entries":
            params = _all_params(optimizer)
            entries = 0
            for i in sorted(set(only)):
                entries += self._restore_entries(optimizer, params[i], i)
            return "entries", entries
        self.restore(optimizer, only)
        return self.scope, 0

    def _restore_entries(self, optimizer: Optimizer, param: Tensor, i: int) -> int:
        """Put the snapshot's values where the parameter or its state is not finite (a
        value that cannot be restored entry by entry, sparse or reshaped, is restored
        whole); how many entries that was."""
        entries = _where_bad(_local(param), self._params[i])
        saved_state = self._state[i]
        live = optimizer.state.get(param)
        if saved_state is None or live is None:
            return entries
        for key, value in saved_state.items():
            current = live.get(key)
            if not isinstance(value, _SavedTensor) or not isinstance(current, Tensor):
                continue  # plain values (a step count) stay the current ones
            local = _local(current)
            if (
                value.buffer.layout != torch.strided
                or local.layout != torch.strided
                or local.shape != value.buffer.shape
            ):
                live[key] = _restore_value(current, value, param)
                entries += local.numel()
            else:
                entries += _where_bad(local, value.buffer)
        return entries

    def _copy_into(self, buffer: Tensor | None, source: Tensor) -> Tensor:
        source = _local(source)
        if source.layout != torch.strided:  # sparse state (SGD's momentum on sparse gradients)
            return source.detach().to("cpu" if self.device == "cpu" else source.device, copy=True)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            if self.device == "cpu":
                buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
            else:
                buffer = torch.empty_like(source)
        buffer.copy_(source.detach(), non_blocking=True)
        return buffer

    def _copy_state(
        self, old: dict[str, Any] | None, state: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        if not state:
            return None
        old = old or {}
        copied: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, Tensor):
                previous = old.get(key)
                buffer = previous.buffer if isinstance(previous, _SavedTensor) else None
                copied[key] = _SavedTensor(
                    self._copy_into(buffer, value), value.device, _dtensor_spec(value)
                )
            else:
                copied[key] = value
        return copied

    def state_dict(self) -> dict[str, Any]:
        """Settings, the step of the snapshot, and the snapshot itself when ``in_state_dict``."""
        state: dict[str, Any] = {
            "every_steps": self.every_steps,
            "snapshot_step": self.snapshot_step,
        }
        if self.in_state_dict and self.snapshot_step is not None:
            state["params"] = [t.to("cpu", copy=True) for t in self._params]
            state["state"] = [
                None
                if s is None
                else {
                    k: (
                        {"tensor": v.buffer.to("cpu", copy=True), "device": str(v.device)}
                        if isinstance(v, _SavedTensor)
                        else v
                    )
                    for k, v in s.items()
                }
                for s in self._state
            ]
            state["buffers"] = [t.to("cpu", copy=True) for t in self._buffers]
        return state

    def observe(self, numbers: StepNumbers) -> None:
        """Nothing to take: the pipeline decides when to :meth:`take` and :meth:`restore`."""

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would hold a snapshot that is not
        finite or not of this optimizer's parameter count (checked again at a restore)."""
        if not isinstance(state_dict, Mapping) or "snapshot_step" not in state_dict:
            raise ValueError("state_dict of Rollback must have a 'snapshot_step' entry")
        if "params" in state_dict and self._bound_count is not None:
            if len(state_dict["params"]) != self._bound_count:
                raise ValueError(
                    f"the rollback snapshot holds {len(state_dict['params'])} parameters, "
                    f"the optimizer has {self._bound_count}"
                )
        for tensor in [*state_dict.get("params", []), *state_dict.get("buffers", [])]:
            if (
                isinstance(tensor, Tensor)
                and tensor.numel()
                and not bool(torch.isfinite(tensor).all())
            ):
                raise ValueError("the rollback snapshot in state_dict holds non-finite weights")

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the snapshot if the state dict carries one; otherwise forget the old one.

        The saved tensors stay on the CPU until a restore copies them into the live
        parameters and state (a snapshot of another parameter set is refused then).
        """
        self.invalidate()
        if "params" not in state_dict:
            return
        self._params = [self._copy_into(None, t) for t in state_dict["params"]]
        self._state = [
            None
            if s is None
            else {
                k: (
                    _SavedTensor(self._copy_into(None, v["tensor"]), torch.device(v["device"]))
                    if isinstance(v, Mapping) and "tensor" in v
                    else v
                )
                for k, v in s.items()
            }
            for s in state_dict["state"]
        ]
        self._buffers = [self._copy_into(None, t) for t in state_dict.get("buffers", [])]
        self.snapshot_step = state_dict["snapshot_step"]

    def __repr__(self) -> str:
        return (
            f"Rollback(every_steps={self.every_steps}, device={self.device!r}, "
            f"in_state_dict={self.in_state_dict}, scope={self.scope!r})"
        )


class _SavedTensor(NamedTuple):
    buffer: Tensor  # the local shard for a DTensor
    device: torch.device  # where the live tensor lives (Adam keeps ``step`` on the CPU)
    spec: tuple[Any, ...] | None = None  # (mesh, placements, shape, stride) of a DTensor


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return DTensor


def _local(tensor: Tensor) -> Tensor:
    """The rank's own values: the local shard of a DTensor, else the tensor itself."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return cast(Any, tensor).to_local()
    return tensor.detach()


def _dtensor_spec(tensor: Tensor) -> tuple[Any, ...] | None:
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return None
    t: Any = tensor
    return (t.device_mesh, tuple(t.placements), t.shape, t.stride())


def _where_bad(live: Tensor, saved: Tensor) -> int:
    """``live[i] = saved[i]`` wherever ``live[i]`` is not finite (in place); how many."""
    if not (live.dtype.is_floating_point or live.dtype.is_complex):
        return 0
    bad = ~torch.isfinite(live)
    live.copy_(torch.where(bad, saved.to(live.device, non_blocking=True), live))
    return int(bad.sum())  # a read, on the rare path of a restore


def _restore_value(current: Any, saved: Any, param: Tensor) -> Any:
    """The live state value holding ``saved``: copied in place where the shapes allow."""
    if not isinstance(saved, _SavedTensor):
        return saved
    if saved.buffer.layout != torch.strided:
        return saved.buffer.to(saved.device, copy=True)
    if isinstance(current, Tensor) and current.layout == torch.strided:
        live = _local(current)
        if live.shape == saved.buffer.shape and live.dtype == saved.buffer.dtype:
            live.copy_(saved.buffer, non_blocking=True)
            return current
    fresh = saved.buffer.to(saved.device, copy=True)
    spec = saved.spec
    if spec is None and saved.buffer.shape == _local(param).shape:
        # Loaded from a state dict (which holds no mesh): a tensor shaped like the
        # parameter's shard is sharded like it (Adam's exp_avg, exp_avg_sq).
        spec = _dtensor_spec(param)
    if spec is not None:
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = spec
        return DTensor.from_local(
            fresh, mesh, placements, run_check=False, shape=shape, stride=stride
        )
    return fresh


def _all_params(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
