"""Fault injection: the failures stableopt exists for, on demand and reproducibly.

A :class:`FaultSchedule` says which fault hits which step; a :class:`FaultInjector`
applies it to one model and optimizer at the point of the training step where
the real failure happens:

=================  ==================  ================================================
kind               when                what
=================  ==================  ================================================
``inf_loss``       before the forward  one target entry is ``+inf``: the loss is Inf and
                                       backward gives non-finite gradients
``poison_batch``   before the forward  the targets are scaled by ``poison_scale`` (a
                                       mislabelled batch: huge but finite gradients)
``nan_grad``       after the backward  some gradient entries become NaN
``grad_spike``     after the backward  every gradient is multiplied by ``spike_factor``
``nan_weights``    inside the update   a step post-hook on the *inner* torch optimizer
                                       writes NaN into a weight right after its update,
                                       with finite gradients (a bad kernel, a bit flip)
=================  ==================  ================================================

A plain optimizer and a :class:`~stableopt.SafeOptimizer` are treated the same:
the weight fault is hooked on the torch optimizer that does the update (the plain
one itself, or ``SafeOptimizer.optimizer``), so both meet it inside their update
and a comparison between them is fair.

Everything is a function of the seeds: :class:`RegressionTask` gives the batch of a
step from ``(seed, step)`` alone, :func:`make_mlp` builds the same weights for the
same seed without touching the global RNG, and the NaN positions of ``nan_grad``
depend on ``(seed, step)`` only. Steps are counted from 1, like the ``steps``
counter of :meth:`SafeOptimizer.stats` and the ``step`` of its events.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from stableopt._checks import check_float, check_int
from stableopt.errors import DivergenceError
from stableopt.optimizer import SafeOptimizer

__all__ = [
    "FAULT_KINDS",
    "FaultInjector",
    "FaultKind",
    "FaultSchedule",
    "RegressionTask",
    "TrainingRun",
    "inner_optimizer",
    "make_mlp",
    "run_training",
]

FaultKind = Literal[
    "nan_grad", "inf_loss", "grad_spike", "nan_weights", "poison_batch", "nan_batch"
]

#: Every fault kind, in the canonical order :meth:`FaultSchedule.random` draws them.
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

_DATA_FAULTS = frozenset({"inf_loss", "poison_batch", "nan_batch"})
_GRAD_FAULTS = frozenset({"nan_grad", "grad_spike"})
_SEED_STRIDE = 1_000_003  # a prime: (seed, step) pairs map to distinct generator seeds


def _check_kind(name: str, kind: Any) -> FaultKind:
    if kind not in FAULT_KINDS:
        raise ValueError(f"{name} must be one of {list(FAULT_KINDS)}, got {kind!r}")
    return kind  # type: ignore[no-any-return]


@dataclass(frozen=True)
class FaultSchedule:
    """Which fault hits which step.

    Args:
        faults: step number (``>= 1``; 1 is the first step) -> fault kind, one of
            :data:`FAULT_KINDS`. At most one fault per step.
        nan_fraction: share of each gradient's entries that ``nan_grad`` sets to
            NaN (default 0.01, in (0, 1]); the first entry of the first gradient is
            always hit, so the fault is never empty.
        spike_factor: what ``grad_spike`` multiplies every gradient by (default
            1e5, ``> 0``).
        poison_scale: what ``poison_batch`` multiplies the targets by (default
            1e4, ``> 0``).

    Example:
        >>> schedule = FaultSchedule({10: "nan_grad", 20: "nan_weights"})
        >>> schedule.at(10), schedule.at(11)
        ('nan_grad', None)
    """

    faults: Mapping[int, FaultKind] = field(default_factory=dict)
    nan_fraction: float = 0.01
    spike_factor: float = 1e5
    poison_scale: float = 1e4

    def __post_init__(self) -> None:
        if not isinstance(self.faults, Mapping):
            raise TypeError(
                f"faults must be a mapping step -> kind, got {type(self.faults).__name__}"
            )
        faults = {
            check_int("fault step", step, minimum=1): _check_kind(f"the fault of step {step}", kind)
            for step, kind in sorted(self.faults.items())
        }
        # Frozen means frozen: a read-only copy, so a schedule shared by two runs stays shared.
        object.__setattr__(self, "faults", MappingProxyType(faults))
        check_float(
            "nan_fraction", self.nan_fraction, minimum=0.0, maximum=1.0, inclusive_min=False
        )
        check_float("spike_factor", self.spike_factor, minimum=0.0, inclusive_min=False)
        check_float("poison_scale", self.poison_scale, minimum=0.0, inclusive_min=False)

    @classmethod
    def random(
        cls, steps: int, rates: Mapping[str, float], seed: int = 0, **options: float
    ) -> FaultSchedule:
        """A random schedule over steps ``1..steps``, the same for the same arguments.

        Each step draws one uniform number ``u``; with the kinds in the order of
        :data:`FAULT_KINDS`, it gets the first kind whose cumulative rate exceeds
        ``u`` (so each step has at most one fault and kind ``k`` hits a step with
        probability ``rates[k]``), or none.

        Args:
            steps: number of steps (``>= 1``).
            rates: fault kind -> probability per step; each in [0, 1], summing to at most 1.
            seed: seed of the draw (Python's ``random.Random``: the same on every platform).
            **options: ``nan_fraction``, ``spike_factor``, ``poison_scale`` (see the class).
        """
        check_int("steps", steps, minimum=1)
        if not isinstance(rates, Mapping):
            raise TypeError(
                f"rates must be a mapping fault kind -> probability, got {type(rates).__name__}"
            )
        for kind, rate in rates.items():
            _check_kind("a key of rates", kind)
            check_float(f"rates[{kind!r}]", rate, minimum=0.0, maximum=1.0)
        if sum(rates.values()) > 1.0 + 1e-12:
            raise ValueError(
                f"rates must sum to at most 1 (one fault per step), got {sum(rates.values()):g}"
            )
        thresholds: list[tuple[float, FaultKind]] = []
        cumulative = 0.0
        for kind in FAULT_KINDS:
            cumulative += float(rates.get(kind, 0.0))
            thresholds.append((cumulative, kind))
        rng = random.Random(check_int("seed", seed, minimum=0))
        faults: dict[int, FaultKind] = {}
        for step in range(1, steps + 1):
            u = rng.random()
            hit = next((kind for bound, kind in thresholds if u < bound), None)
            if hit is not None:
                faults[step] = hit
        return cls(faults, **options)

    def at(self, step: int) -> FaultKind | None:
        """The fault of ``step``, or ``None``."""
        return self.faults.get(step)

    def steps_of(self, kind: str) -> list[int]:
        """The steps hit by ``kind``, in order."""
        _check_kind("kind", kind)
        return [step for step, k in self.faults.items() if k == kind]

    def describe(self) -> str:
        """One line: ``step 60 nan_grad, step 150 grad_spike (x1e+05), ...`` or ``no faults``."""
        if not self.faults:
            return "no faults"
        details = {
            "grad_spike": f" (x{self.spike_factor:g})",
            "poison_batch": f" (targets x{self.poison_scale:g})",
        }
        return ", ".join(
            f"step {step} {kind}{details.get(kind, '')}" for step, kind in self.faults.items()
        )

    def __len__(self) -> int:
        return len(self.faults)

    def __iter__(self) -> Iterator[tuple[int, FaultKind]]:
        return iter(self.faults.items())


def inner_optimizer(optimizer: Optimizer) -> Optimizer:
    """The torch optimizer that performs the update: ``optimizer.optimizer`` for a
    :class:`~stableopt.SafeOptimizer`, else ``optimizer`` itself."""
    if isinstance(optimizer, SafeOptimizer):
        return optimizer.optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    return optimizer


class FaultInjector:
    """Apply a :class:`FaultSchedule` to one model's training step.

    Call, in every step: :meth:`begin_step` first, :meth:`corrupt_batch` on the
    batch before the forward, :meth:`corrupt_grads` after the backward and before
    ``optimizer.step()``. ``nan_weights`` needs no call: a step post-hook on the
    inner optimizer (see :func:`inner_optimizer`) fires inside the update, once per
    scheduled step. Use it as a context manager, or call :meth:`close`, to remove
    the hook.

    Args:
        schedule: the faults.
        optimizer: the optimizer of the run (plain or :class:`~stableopt.SafeOptimizer`).
        seed: seed of the NaN positions of ``nan_grad`` (default 0, ``>= 0``).

    Attributes:
        injected: ``(step, kind)`` of every fault applied so far, in order.
    """

    def __init__(self, schedule: FaultSchedule, optimizer: Optimizer, *, seed: int = 0) -> None:
        if not isinstance(schedule, FaultSchedule):
            raise TypeError(f"schedule must be a FaultSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.seed = check_int("seed", seed, minimum=0)
        self.injected: list[tuple[int, FaultKind]] = []
        self._step = 0
        self._has_fired = False
        self._hook = inner_optimizer(optimizer).register_step_post_hook(self._after_update)

    @property
    def fault(self) -> FaultKind | None:
        """The fault of the current step (set by :meth:`begin_step`)."""
        return self.schedule.at(self._step)

    def begin_step(self, step: int) -> FaultKind | None:
        """Enter step ``step`` (counted from 1); return its fault, if any."""
        self._step = check_int("step", step, minimum=1)
        self._has_fired = False
        return self.fault

    @torch.no_grad()
    def corrupt_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Before the forward: apply ``inf_loss`` / ``poison_batch`` / ``nan_batch`` (a NaN in
        the first input value: the forward pass carries it into every activation, and into
        the running statistics of a BatchNorm layer) on copies."""
        kind = self.fault
        if kind not in _DATA_FAULTS:
            return inputs, targets
        if kind == "inf_loss":
            targets = targets.clone()
            targets.view(-1)[0] = math.inf
        elif kind == "nan_batch":
            inputs = inputs.clone()
            inputs.view(-1)[0] = math.nan
        else:
            targets = targets * self.schedule.poison_scale
        self._record(kind)
        return inputs, targets

    @torch.no_grad()
    def corrupt_grads(self, params: Iterable[Tensor]) -> None:
        """After the backward: apply ``nan_grad`` / ``grad_spike`` to the ``.grad`` of ``params``."""
        kind = self.fault
        if kind not in _GRAD_FAULTS:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise ValueError(
                f"step {self._step}: {kind} is scheduled but no parameter has a gradient"
            )
        if kind == "grad_spike":
            for grad in grads:
                grad.mul_(self.schedule.spike_factor)
        else:
            generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + self._step)
            for grad in grads:
                hit = torch.rand(grad.shape, generator=generator) < self.schedule.nan_fraction
                grad.masked_fill_(hit.to(grad.device), math.nan)
            grads[0].view(-1)[0] = math.nan
        self._record(kind)

    def _after_update(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # Fires inside inner.step(), after its update and before SafeOptimizer's
        # weight check: exactly where a faulty kernel would leave its garbage.
        if self.fault != "nan_weights" or self._has_fired:
            return
        first = next(p for group in optimizer.param_groups for p in group["params"])
        with torch.no_grad():
            first.view(-1)[0] = math.nan
        self._has_fired = True
        self._record("nan_weights")

    def _record(self, kind: FaultKind) -> None:
        self.injected.append((self._step, kind))

    def close(self) -> None:
        """Remove the weight-fault hook from the optimizer."""
        self._hook.remove()

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- a tiny task to inject faults into ------------------------------------------------


def make_mlp(
    in_features: int = 8, hidden: int = 32, out_features: int = 1, *, seed: int = 0
) -> nn.Module:
    """A two-hidden-layer tanh MLP whose weights depend on ``seed`` only (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, out_features),
        )


@dataclass(frozen=True)
class RegressionTask:
    """Synthetic regression: ``y = sum_k sin(x @ W)_k / sqrt(k) + noise`` with a seeded teacher ``W``.

    The batch of a step depends on ``(seed, step)`` only, so two runs see the same
    data in the same order, and a run can be resumed at any step.

    Args:
        in_features: input size (default 8).
        hidden: hidden width of :meth:`make_model` (default 32).
        batch_size: samples per batch (default 64).
        noise: standard deviation of the target noise (default 0.05): the best
            reachable MSE is about ``noise**2``.
        seed: seed of the teacher, the batches and the model (default 0).
    """

    in_features: int = 8
    hidden: int = 32
    batch_size: int = 64
    noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("in_features", "hidden", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_float("noise", self.noise, minimum=0.0)
        check_int("seed", self.seed, minimum=0)

    def _teacher(self) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE)
        return torch.randn(self.in_features, 4, generator=generator) / math.sqrt(self.in_features)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, self.in_features, generator=generator)
        y = torch.sin(2.0 * x @ self._teacher()).sum(dim=1, keepdim=True) / 2.0
        return x, y + self.noise * torch.randn(n, 1, generator=generator)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch ``(x, y)`` of ``step`` (``>= 1``)."""
        check_int("step", step, minimum=1)
        return self._sample(
            self.batch_size, torch.Generator().manual_seed(self.seed * _SEED_STRIDE + step)
        )

    def held_out(self, n: int = 1024) -> tuple[Tensor, Tensor]:
        """``n`` held-out samples, drawn apart from every training batch."""
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + _SEED_STRIDE - 1)
        return self._sample(check_int("n", n, minimum=1), generator)

    def make_model(self) -> nn.Module:
        """The task's MLP, initialised from ``seed``."""
        return make_mlp(self.in_features, self.hidden, 1, seed=self.seed)


@dataclass
class TrainingRun:
    """What :func:`run_training` saw.

    Attributes:
        losses: the training loss of every step run (as the loop saw it, before the update).
        held_out_loss: MSE on :meth:`RegressionTask.held_out` after the last step.
        first_nonfinite_step: the first step whose loss was non-finite although no
            ``inf_loss`` fault made it so (the model itself broke), or ``None``.
        injected: ``(step, kind)`` of every fault applied.
        error: the :class:`~stableopt.DivergenceError` that ended the run, if any;
            ``losses`` then stops at the step that raised it.
    """

    losses: list[float]
    held_out_loss: float
    first_nonfinite_step: int | None
    injected: list[tuple[int, FaultKind]]
    error: DivergenceError | None = None


def run_training(
    model: nn.Module,
    optimizer: Optimizer,
    task: RegressionTask,
    steps: int,
    schedule: FaultSchedule | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss,
) -> TrainingRun:
    """Train ``model`` for ``steps`` steps of ``task`` under ``schedule``'s faults.

    The loop is the ordinary one (``zero_grad``, forward, ``backward``, ``step``)
    with the injector's calls at their points, so any optimizer runs unchanged. A
    :class:`~stableopt.DivergenceError` from ``step()`` ends the run and is
    returned in :attr:`TrainingRun.error`, not raised.
    """
    check_int("steps", steps, minimum=1)
    schedule = schedule if schedule is not None else FaultSchedule()
    params = list(model.parameters())
    losses: list[float] = []
    first_nonfinite_step: int | None = None
    error: DivergenceError | None = None
    with FaultInjector(schedule, optimizer, seed=task.seed) as injector:
        for step in range(1, steps + 1):
            injector.begin_step(step)
            inputs, targets = injector.corrupt_batch(*task.batch(step))
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            injector.corrupt_grads(params)
            losses.append(float(loss.detach()))
            if (
                first_nonfinite_step is None
                and not math.isfinite(losses[-1])
                and injector.fault != "inf_loss"
            ):
                first_nonfinite_step = step
            try:
                optimizer.step()
            except DivergenceError as exc:
                error = exc
                break
        injected = list(injector.injected)
    with torch.no_grad():
        inputs, targets = task.held_out()
        held_out_loss = float(loss_fn(model(inputs), targets))
    return TrainingRun(losses, held_out_loss, first_nonfinite_step, injected, error)
