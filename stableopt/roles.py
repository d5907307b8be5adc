"""The role of each stage slot, as a :class:`typing.Protocol` with exactly the members the
pipeline uses.

``SafeOptimizer(clip=..., spike=..., rollback=..., skip_rules=[...], lr_policies=[...])``
takes any object that has the members of its slot's role (checked structurally: no need to
inherit from anything): :func:`protocol_members` lists them, and the registry
(:mod:`stableopt.registry`) refuses an object that lacks one, naming it. Members
marked *optional* are read with a default when absent. ``tests/test_roles.py`` plugs a
minimal stand-in with exactly these members into every slot.

Every role is a :class:`~stableopt.stages.base.Stage` (``name``, ``observe(numbers)``,
``state_dict()``, ``load_state_dict()``): the pipeline hands every stage each finished
step's numbers, and checkpoints every stage's state.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from stableopt.stages.base import ClipPolicy, Stage

if TYPE_CHECKING:
    from torch import Tensor
    from torch.optim import Optimizer

    from stableopt._num import Num
    from stableopt.escalation import Transition
    from stableopt.stages.emergency_lr import Trigger
    from stableopt.stages.lr_factor import LRChange
    from stableopt.verdict import StepVerdict

__all__ = [
    "ClipPolicy",
    "EmergencyClipRole",
    "EmergencyLRRole",
    "EscalationRole",
    "HotLRRole",
    "LRPolicy",
    "LedgerRole",
    "PlateauRole",
    "RerunRole",
    "RollbackRole",
    "SkipRule",
    "SpikeRole",
    "Stage",
    "protocol_members",
]


@runtime_checkable
class SkipRule(Stage, Protocol):
    """A rule that skips a step whose gradient norm or loss is above a bound it sets.

    ``bound(signal)`` is asked before each step for ``"grad_norm"`` and ``"loss"``: the
    value above which that signal skips the step now, or ``None`` (no bound). The check is
    one comparison of the step's number with it, on the host or on the device, so a rule
    costs no sync. A skip by your rule has the reason ``SkipReason.RULE`` and your rule's
    ``name`` in the event's labels; it counts as a failed step (a run of them leads to a
    rollback, then a stop, as for any failure). Keep your history in ``observe``: it gets
    every finished step's numbers (``numbers.is_accepted`` says whether the update ran).
    """

    def bound(self, signal: str) -> float | None:
        """The value above which ``signal`` (``"grad_norm"`` or ``"loss"``) skips the step."""
        ...


@runtime_checkable
class SpikeRole(SkipRule, Protocol):
    """The ``spike`` slot: a skip rule that also says which signals it watches and why a
    value is a spike (:class:`~stableopt.stages.spike.SpikeGuard`). Optional:
    ``rebase(level)``, called when a run of spikes becomes the run's new level."""

    def watches(self, signal: str) -> bool:
        """Whether ``signal`` (``"loss"`` or ``"grad_norm"``) is tested."""
        ...

    def evidence(self, signal: str, value: float) -> dict[str, float]:
        """Why ``value`` crosses the bound, as numbers (``z`` and ``z_threshold``, or
        ``ratio``, ``history`` and ``early_ratio``): what the skip event carries."""
        ...

    def level(self, signal: str) -> float | None:
        """The signal's level now: what a gradient-norm spike is clipped back to when a clip
        policy is on (``None``: no level yet)."""
        ...

    def skip_bound(self, signal: str) -> float | None:
        """Where gradient-norm spikes are clipped, the value above which one is skipped all
        the same (at least :meth:`bound`; ``None`` or ``inf``: never)."""
        ...


@runtime_checkable
class EmergencyClipRole(Stage, Protocol):
    """The ``emergency_clip`` slot (:class:`~stableopt.stages.emergency_clip.EmergencyClip`).
    Optional: ``rebase(level)``."""

    #: skip any step whose norm is above this (``None``: never)
    skip_above: float | None

    @property
    def threshold(self) -> float | None:
        """The norm above which a step is an emergency now (``None``: not known yet)."""
        ...

    def limit(self, max_norm: Num, grad_norm: Num) -> Num:
        """The max norm of this step: the policy's, reduced in an emergency."""
        ...


@runtime_checkable
class LRPolicy(Stage, Protocol):
    """An LR policy of yours (``SafeOptimizer(lr_policies=[...])``): a multiplier on the
    scheduled LR, applied around the update with every other policy's (their product).

    Move ``factor`` in ``observe`` (each finished step's numbers); each change is an
    ``lr_cut`` or ``lr_recovery`` event with the cause ``Cause.POLICY`` and your ``name``.
    """

    #: the multiplier now (1.0: no change)
    factor: float
    #: the effective LR is never below this (unless the schedule is)
    min_lr: float


@runtime_checkable
class EmergencyLRRole(LRPolicy, Protocol):
    """The ``emergency_lr`` slot (:class:`~stableopt.stages.emergency_lr.EmergencyLR`)."""

    @property
    def in_emergency(self) -> bool:
        """A cut is in force."""
        ...

    def trigger(self, grad_norm: float, loss: float | None) -> Trigger | None:
        """An absolute threshold this step crossed, as a trigger for :meth:`update`."""
        ...

    def weight_fault(self, step: int) -> bool:
        """Record an update that wrote non-finite weights; whether it cuts."""
        ...

    def update(
        self, step: int, trigger: Trigger | None, is_healthy: bool = True, immediate: bool = False
    ) -> LRChange | None:
        """Advance one step: maybe cut on ``trigger``, else count towards recovery."""
        ...


@runtime_checkable
class HotLRRole(LRPolicy, Protocol):
    """The ``hot_lr`` slot (:class:`~stableopt.stages.hot_lr.HotLR`)."""

    @property
    def is_elevated(self) -> bool:
        """The loss is above the hot level now (no snapshot is taken then)."""
        ...

    def update(self, loss: float | None, maximize: bool = False) -> LRChange | None:
        """An accepted step's loss: a cut (the response restores the snapshot), a recovery."""
        ...

    def restart(self) -> None:
        """The weights the recent losses came from were restored: forget them."""
        ...

    def rebase(self, *args: Any) -> None:
        """The loss has a new scale (a new level): the next losses are the new start."""
        ...


@runtime_checkable
class PlateauRole(LRPolicy, Protocol):
    """The ``plateau`` slot (:class:`~stableopt.stages.plateau.PlateauLR`)."""

    #: the effective LR is never above this (``None``: no cap)
    max_lr: float | None

    def update(self) -> LRChange | None:
        """Once per step on the host: a reduction, or ``None``."""
        ...

    def restart(self) -> None:
        """Forget the window after an intervention."""
        ...


@runtime_checkable
class RollbackRole(Stage, Protocol):
    """The ``rollback`` slot (:class:`~stableopt.stages.rollback.Rollback`). Optional:
    ``check_state_dict(state_dict)``, which ``load_state_dict`` of the optimizer calls to
    validate before anything is loaded (without it, a deep copy of the stage loads it)."""

    @property
    def has_snapshot(self) -> bool:
        """A snapshot exists."""
        ...

    #: the step of the snapshot (``None``: none)
    snapshot_step: int | None

    def is_due(self, good_steps: int) -> bool:
        """Whether the state after ``good_steps`` good steps is to be snapshotted."""
        ...

    def take(
        self,
        optimizer: Optimizer,
        step: int,
        verified: bool = False,
        buffers: Sequence[Tensor] = (),
    ) -> tuple[int, ...]:
        """Snapshot; return the parameters found non-finite (then nothing is taken)."""
        ...

    def restore(
        self,
        optimizer: Optimizer,
        only: Collection[int] | None = None,
        entries: bool = False,
        buffers: Sequence[Tensor] = (),
    ) -> None:
        """Put the snapshot back (everything, with ``buffers``)."""
        ...

    def restore_corrupted(
        self, optimizer: Optimizer, only: Collection[int], buffers: Sequence[Tensor] = ()
    ) -> tuple[str, int]:
        """Restore what the parameters ``only`` hold of NaN/Inf; the scope applied
        (``"entries"``, ``"corrupted"`` or ``"all"``) and the entries restored (0 unless
        ``"entries"``)."""
        ...

    def invalidate(self) -> None:
        """Forget the snapshot."""
        ...


@runtime_checkable
class EscalationRole(Stage, Protocol):
    """The ``escalation`` slot (:class:`~stableopt.escalation.Escalation`)."""

    #: failed steps in a row now
    consecutive_failures: int
    #: failed steps in a row that stop the run (``SafeOptimizer(max_consecutive_failures=)``
    #: sets it)
    max_consecutive_failures: int

    def next(self, verdict: StepVerdict) -> Transition:
        """The transition ``verdict`` makes."""
        ...


@runtime_checkable
class RerunRole(Stage, Protocol):
    """The ``rerun`` slot (:class:`~stableopt.rerun.Rerun`)."""

    #: transient faults per device
    by_device: dict[str, int]

    def capture(self) -> Any:
        """The RNG state before the first evaluation of a closure."""
        ...

    def restore(self, state: Any) -> None:
        """Put the RNG state back."""
        ...

    def applies(self, verdict: StepVerdict) -> bool:
        """Whether a second evaluation can tell ``verdict``'s skip apart."""
        ...

    def count(self, devices: Iterable[str]) -> None:
        """One transient fault on ``devices``."""
        ...


@runtime_checkable
class LedgerRole(Stage, Protocol):
    """The ``ledger`` slot (:class:`~stableopt.ledger.Ledger`)."""

    def tag(self, ids: Any) -> None:
        """Name the coming step's batch."""
        ...

    def take_tag(self) -> Any:
        """The step's tag (and forget it)."""
        ...

    def is_known_bad(self, tag: Any) -> bool:
        """Whether this exact batch failed before."""
        ...

    def first_failure(self, tag: Any) -> int | None:
        """The step at which the batch ``tag`` first failed, or ``None``."""
        ...

    def record(
        self,
        step: int,
        status: str,
        reason: str,
        grad_norm: float | None,
        loss: float | None,
        tag: Any,
        cause: Any = None,
    ) -> Any:
        """Add a failing step."""
        ...


def protocol_members(role: type) -> tuple[str, ...]:
    """The members of ``role`` (a protocol of this module, or
    :class:`~stableopt.stages.base.ClipPolicy`), its bases' included, sorted."""
    members: set[str] = set()
    for klass in role.__mro__:
        if klass in (object, Protocol) or klass.__module__ == "typing":
            continue
        members |= {
            name for name in getattr(klass, "__annotations__", {}) if not name.startswith("_")
        }
        members |= {
            name
            for name, value in vars(klass).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))
        }
    return tuple(sorted(members))
