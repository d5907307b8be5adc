"""The training loop, LR schedules and inner optimizers the new benchmarks share.

:func:`train` runs the ordinary loop (``zero_grad``, forward, loss, ``backward``,
``step``, ``scheduler.step()``) on a :class:`~benchmarks.tasks.Task` for a fixed number
of steps, with a hook between ``backward`` and ``step`` for a method's own work
(a clip, a skip rule). A :class:`~stableopt.DivergenceError` ends the run and is
recorded, not raised. The held-out metric is read before the first step (the
*initial* loss) and after the last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from benchmarks.tasks import Task, held_out_metric
from stableopt import DivergenceError

__all__ = [
    "INNER_OPTIMIZERS",
    "SCHEDULES",
    "Outcome",
    "lr_multiplier",
    "make_inner",
    "make_scheduler",
    "train",
]

#: ``constant``: a ``LambdaLR`` at 1; ``cosine``: 5% linear warm-up, then cosine decay to
#: 10% of the peak; ``none``: no scheduler object at all.
SCHEDULES = ("constant", "cosine", "none")


def lr_multiplier(schedule: str, steps: int) -> Callable[[int], float]:
    """``LambdaLR``'s multiplier of step ``t`` (0-based) for ``schedule`` over ``steps`` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule != "cosine":
        return lambda t: 1.0
    warmup = max(1, steps // 20)

    def cosine(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return cosine


def make_scheduler(optimizer: Optimizer, schedule: str, steps: int) -> Any:
    """The ``LambdaLR`` of ``schedule`` on ``optimizer``, or ``None`` for ``"none"``."""
    if schedule == "none":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, steps))


def _sgd(params: Iterable[Tensor], lr: float) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _nesterov(params: Iterable[Tensor], lr: float) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _adamw(impl: str) -> Callable[[Iterable[Tensor], float], Optimizer]:
    def make(params: Iterable[Tensor], lr: float) -> Optimizer:
        if impl == "fused":
            return torch.optim.AdamW(params, lr=lr, fused=True)
        return torch.optim.AdamW(params, lr=lr, foreach=impl == "foreach")

    return make


#: name -> ``(params, lr) -> torch optimizer``: the inner optimizers of the benchmarks.
INNER_OPTIMIZERS: dict[str, Callable[[Iterable[Tensor], float], Optimizer]] = {
    "sgd-momentum": _sgd,
    "sgd-nesterov": _nesterov,
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw-forloop": _adamw("forloop"),
    "adamw-foreach": _adamw("foreach"),
    "adamw-fused": _adamw("fused"),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
    "rprop-maximize": lambda params, lr: torch.optim.Rprop(params, lr=lr, maximize=True),
}


def make_inner(name: str, params: Iterable[Tensor], lr: float) -> Optimizer:
    """The inner optimizer ``name`` of :data:`INNER_OPTIMIZERS`."""
    return INNER_OPTIMIZERS[name](params, lr)


@dataclass
class Outcome:
    """What :func:`train` saw."""

    initial: float  # held-out metric before the first step
    final: float  # held-out metric after the last step run (NaN/inf when the run broke)
    steps_run: int
    error: str  # "DivergenceError at step N: ..." or ""
    seconds: float
    grad_norms: list[float]  # pre-step total gradient norm of every step (when asked)

    @property
    def died(self) -> bool:
        """A DivergenceError, or a non-finite final held-out loss."""
        return bool(self.error) or not math.isfinite(self.final)


def _total_norm(params: Sequence[Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.detach().norm() for g in grads])))


def train(
    task: Task,
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    *,
    scheduler: Any = None,
    step: Callable[[Tensor], Any] | None = None,
    record_norms: bool = False,
) -> Outcome:
    """Train ``model`` on ``task`` for ``steps`` steps (counted from 1).

    ``step(loss)``, when given, replaces ``optimizer.step()`` after ``backward``: a
    method's own step (a clip first, a skip rule, a wrapper that is not a torch
    optimizer). ``scheduler.step()`` runs every loop step, skipped steps included, as a
    user's loop does.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    initial = held_out_metric(task, model)
    started = time.perf_counter()
    error = ""
    norms: list[float] = []
    done = 0
    for t in range(1, steps + 1):
        x, y = task.batch(t)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if record_norms:
            norms.append(_total_norm(params))
        try:
            if step is None:
                optimizer.step()
            else:
                step(loss)
        except DivergenceError as exc:
            error = f"DivergenceError at step {t}: {str(exc).splitlines()[0][:160]}"
            break
        done = t
        if scheduler is not None:
            scheduler.step()
    seconds = time.perf_counter() - started
    final = held_out_metric(task, model)
    return Outcome(initial, final, done, error, seconds, norms)
