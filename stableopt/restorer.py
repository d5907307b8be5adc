"""Restoring: snapshots of the weights, the optimizer state, the model's buffers and the
histories that judge a step; and putting them back.

The rollback stage (:class:`~stableopt.stages.rollback.Rollback`, or your own object with
its members) holds the tensors. The histories of the judging stages (the clip policy's,
the emergency clip's, the skip rules') are kept here, with the snapshot's step: they go
back with the weights on a full restore, since the values after the snapshot came from
weights that are gone, and judged against them the restored run's first steps would look
like spikes. A restore of the corrupted entries only keeps them: the step's values are good.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

from stableopt.buffers import ModelBuffers
from stableopt.roles import RollbackRole, Stage

__all__ = ["Restored", "Restorer"]


@dataclass(frozen=True)
class Restored:
    """What a restore put back.

    Attributes:
        scope: ``"all"`` (weights, state, buffers and histories), ``"corrupted"`` (the
            corrupted parameters whole) or ``"entries"`` (their NaN/Inf entries).
        params: how many parameters (all of them for ``"all"``).
        snapshot_step: the step the snapshot was taken at.
        buffers: the model's buffers went back with them.
        entries: for ``"entries"``, how many NaN/Inf entries (weights and state) were put back.
        undone: the good updates the restore undid (0 for ``"entries"``: every finite value
            stays), counted from the snapshot.
    """

    scope: str
    params: int
    snapshot_step: int
    buffers: bool
    entries: int = 0
    undone: int = 0


class Restorer:
    """Take snapshots when due, restore them (see the module docstring).

    Args:
        optimizer: the inner optimizer (its parameters and state are what is copied).
        rollback: the rollback stage (``None``: off: nothing to restore).
        buffers: the model's buffers (``None``: none watched).
        judging: the judging stages by name, whose histories go with a snapshot.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        rollback: RollbackRole | None,
        buffers: ModelBuffers | None,
        judging: Mapping[str, Stage],
    ) -> None:
        self.optimizer = optimizer
        self.rollback = rollback
        self.buffers = buffers
        self.judging = dict(judging)
        #: the judging stages' state at the snapshot
        self.stage_states: dict[str, Any] = {}
        self._pending = False  # a snapshot came due while the loss was elevated
        #: good steps done when the snapshot was taken (what a restore undoes is counted from it)
        self.snapshot_good_steps = 0
        #: how many parameters the snapshot holds (the first ones in ``param_groups`` order;
        #: groups added since are not in it)
        self.snapshot_params = 0

    @property
    def has_snapshot(self) -> bool:
        """A snapshot exists to restore."""
        return self.rollback is not None and self.rollback.has_snapshot

    @property
    def snapshot_step(self) -> int:
        """The step of the snapshot (0 when there is none)."""
        if self.rollback is None or self.rollback.snapshot_step is None:
            return 0
        return int(self.rollback.snapshot_step)

    def is_due(self, good_steps: int) -> bool:
        """Whether the state after ``good_steps`` good steps is to be snapshotted (one that
        came due while the loss was elevated is due at the next good step)."""
        return self.rollback is not None and (self._pending or self.rollback.is_due(good_steps))

    def after_good_step(
        self, step: int, good_steps: int, verified: bool, defer: bool
    ) -> tuple[int, ...]:
        """A good step: snapshot when due, unless ``defer`` (the loss is climbing: not these
        weights; the next good step then); the parameters a snapshot found non-finite."""
        if not self.is_due(good_steps):
            return ()
        if defer:
            self._pending = True
            return ()
        self._pending = False
        return self.take(step, verified, good_steps)

    def take(self, step: int, verified: bool = False, good_steps: int = 0) -> tuple[int, ...]:
        """Snapshot the weights, the optimizer state, the buffers and the judging histories
        (after ``good_steps`` good steps); return the parameters found non-finite (then
        nothing is taken)."""
        assert self.rollback is not None
        bad = self.rollback.take(self.optimizer, step, verified, buffers=self._buffers())
        if not bad:
            self.snapshot_good_steps = good_steps
            self.snapshot_params = self._param_count()
            self.stage_states = {
                name: copy.deepcopy(stage.state_dict()) for name, stage in self.judging.items()
            }
        return bad

    def restore_all(self, good_steps: int = 0) -> Restored:
        """Everything back to the snapshot, the judging histories included (``good_steps``:
        done so far, to count what is undone)."""
        assert self.rollback is not None
        buffers = self._buffers()
        self.rollback.restore(self.optimizer, buffers=buffers)
        self._restore_histories()
        undone = max(0, good_steps - self.snapshot_good_steps)
        return Restored("all", self.snapshot_params, self.snapshot_step, bool(buffers), 0, undone)

    def restore_corrupted(self, only: tuple[int, ...], good_steps: int = 0) -> Restored:
        """What the parameters ``only`` hold of NaN/Inf, as the rollback's scope says."""
        assert self.rollback is not None
        buffers = self._buffers()
        scope, entries = self.rollback.restore_corrupted(self.optimizer, only, buffers=buffers)
        undone = max(0, good_steps - self.snapshot_good_steps)
        if scope == "all":
            self._restore_histories()
            count = self.snapshot_params
            return Restored("all", count, self.snapshot_step, bool(buffers), 0, undone)
        # "corrupted": those parameters lose what they learnt since; "entries": nothing
        return Restored(
            scope,
            len(only),
            self.snapshot_step,
            False,
            entries,
            undone if scope == "corrupted" else 0,
        )

    def invalidate(self) -> None:
        """Forget the snapshot (the parameter set or the state changed under it)."""
        if self.rollback is not None:
            self.rollback.invalidate()
        self.stage_states = {}
        self.snapshot_params = 0

    def _restore_histories(self) -> None:
        for name, stage in self.judging.items():
            if name in self.stage_states:
                stage.load_state_dict(copy.deepcopy(self.stage_states[name]))

    def _buffers(self) -> list[Any]:
        return self.buffers.tensors() if self.buffers is not None else []

    def _param_count(self) -> int:
        return sum(len(group["params"]) for group in self.optimizer.param_groups)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self, with_snapshot: bool) -> dict[str, Any]:
        """The judging histories at the snapshot, when the snapshot itself is saved."""
        if not with_snapshot:
            return {}
        return {
            "stage_states": copy.deepcopy(self.stage_states),
            "snapshot_good_steps": self.snapshot_good_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.stage_states = copy.deepcopy(dict(state_dict.get("stage_states", {})))
        self.snapshot_good_steps = int(state_dict.get("snapshot_good_steps", 0))
        self.snapshot_params = self._param_count() if self.has_snapshot else 0
