"""Which process group the optimizer's tensors are partitions over (DeepSpeed ZeRO).

DeepSpeed's ZeRO optimizers (stages 1, 2 and 3) take the client optimizer's parameter
groups over: before calling ``step()`` they put each rank's flat fp32 partition of the
parameters in place of the parameters, with that partition of the averaged gradient,
and the optimizer state grows on those partitions. Each rank then sees a disjoint slice
of the model, so a norm, a finite flag or a weight check of its own slice would make it
decide alone. The step sums those statistics over the data-parallel group instead
(:func:`stableopt.grad_norms.partitioned`), and every rank decides the same.

The partitions are recognised without an argument: DeepSpeed is loaded, more than one
rank runs, and the tensors in ``param_groups`` are not the parameters the optimizer was
built with (or given by ``add_param_group``).

The engine and the optimizer agree on what was skipped. The ZeRO optimizer (the object
whose ``step()`` calls ours) is found once, from the calling frame, and its ``step`` is
wrapped on that instance: a step it skipped itself (its overflow check) without calling
ours is counted as a skipped step (:meth:`~stableopt.SafeOptimizer.skipped_by_engine`), and
a step ours skipped or rolled back sets its ``overflow`` flag, which DeepSpeed's engine
reads for ``was_step_applied()``, ``skipped_steps`` and the LR scheduler, and accelerate
for ``optimizer_step_was_skipped`` (the HF Trainer's view). The flag is reset by the ZeRO
optimizer at its next step.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

import torch.distributed as dist
from torch import Tensor

__all__ = ["Partitions", "ZeroPartitions"]

log = logging.getLogger(__name__)

#: How many frames up from ``SafeOptimizer.step`` the ZeRO optimizer's ``step`` is looked for
#: (stage 1/2: ``step`` -> ``_optimizer_step`` -> ours; stage 3 goes through a timer too).
_FRAMES = 8


class _Owner(Protocol):
    """What the wrapper hook needs of the optimizer it serves."""

    @property
    def last_step(self) -> Any: ...

    def skipped_by_engine(self) -> None: ...

    @property
    def accounting(self) -> Any: ...


@dataclass(frozen=True)
class ZeroPartitions:
    """The optimizer steps ZeRO partitions, summed over ``group`` (``None``: all ranks)."""

    group: Any
    ranks: int


class Partitions:
    """Finds, once, whether the tensors a step sees are ZeRO partitions, and over what.

    Decided once, at the first step that has parameters (a ZeRO optimizer takes the groups
    over in ``deepspeed.initialize``, before any step): a step pays one dict read after that.

    Args:
        params: the parameters the optimizer was built with.
        groups: how many parameter groups it was built with.
    """

    def __init__(self, params: Iterable[Tensor], groups: int) -> None:
        self._own = {id(p) for p in params}
        self._groups_at_build = groups
        self._decided = False
        self.found: ZeroPartitions | None = None
        self._per_group_said = False
        #: the ZeRO optimizer whose ``step`` calls ours (a weak reference), once found
        self.engine_optimizer: Callable[[], Any] | None = None

    def add(self, params: Iterable[Tensor], groups: int) -> None:
        """Parameters of a new group (``add_param_group``); ``groups``: how many now."""
        self._own.update(id(p) for p in params)
        self._groups_at_build = groups

    def of_step(self, param_groups: list[dict[str, Any]], owner: _Owner) -> ZeroPartitions | None:
        """The partitions of this step, or ``None`` where the tensors are whole (``owner``:
        the optimizer whose step this is; the ZeRO optimizer calling it is hooked once)."""
        if self._decided:
            if self.found is not None:
                self._say_per_group(param_groups)
            return self.found
        tensors = [p for group in param_groups for p in group["params"]]
        if not tensors:
            return None  # decided at the first step that has parameters
        self._decided = True
        if "deepspeed" not in sys.modules or not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() == 1 or all(id(p) in self._own for p in tensors):
            return None
        group = _data_parallel_group()
        ranks = dist.get_world_size(group) if group is not None else dist.get_world_size()
        self.found = ZeroPartitions(group, ranks)
        self._hook_engine_optimizer(owner)
        log.info(
            "DeepSpeed ZeRO partitions: every decision comes from statistics summed over the "
            "data-parallel group (%d ranks), so every rank decides the same",
            ranks,
        )
        self._say_per_group(param_groups)
        return self.found

    def _hook_engine_optimizer(self, owner: _Owner) -> None:
        """Find the ZeRO optimizer calling ``owner.step`` and wrap its ``step`` (see the
        module docstring); where none is found (another caller), nothing is wrapped."""
        frame: FrameType | None = sys._getframe(2)
        for _ in range(_FRAMES):
            if frame is None:
                return
            caller = frame.f_locals.get("self")
            if (
                caller is not None
                and caller is not owner
                and getattr(caller, "optimizer", None) is owner
                and hasattr(caller, "overflow")
            ):
                break
            frame = frame.f_back
        else:
            return
        if getattr(caller.step, "_stableopt_hooked", False):
            return
        original = caller.step
        owner_ref = weakref.ref(owner)

        def step(*args: Any, **kwargs: Any) -> Any:
            safe = owner_ref()
            before = safe.accounting.step if safe is not None else 0
            result = original(*args, **kwargs)
            if safe is None:
                return result
            if safe.accounting.step == before:  # it skipped without calling us
                if getattr(caller, "overflow", False):
                    safe.skipped_by_engine()
            elif safe.last_step is not None and safe.last_step.status != "updated":
                caller.overflow = True  # ours skipped or rolled back: the engine sees it
            return result

        step._stableopt_hooked = True  # type: ignore[attr-defined]
        caller.step = step
        self.engine_optimizer = weakref.ref(caller)

    def _say_per_group(self, param_groups: list[dict[str, Any]]) -> None:
        if self._per_group_said or self._groups_at_build <= 1:
            return
        filled = sum(1 for group in param_groups if group["params"])
        if filled < self._groups_at_build:
            self._per_group_said = True
            log.warning(
                "DeepSpeed ZeRO calls step() once per parameter group (%d groups): each call "
                "is decided and counted as a step of its own (the same decision on every rank, "
                "but the groups of one training step may be clipped or skipped apart). One "
                "parameter group decides for the whole model",
                self._groups_at_build,
            )


def _data_parallel_group() -> Any:
    """DeepSpeed's data-parallel group (``None``, the default group, where it has none)."""
    try:
        from deepspeed.utils import groups

        group = groups._get_data_parallel_group()
    except Exception:  # an older or newer layout: the whole world is the DP group
        return None
    if group is not None and dist.get_world_size(group) == dist.get_world_size():
        return None
    return group
