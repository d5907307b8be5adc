"""What every real-recipe module shares: the wrapper hook, the faults, the loop, the outcome.

A recipe module (:mod:`benchmarks.recipes_gpt`, ``recipes_tacotron``, ``recipes_resnet``,
``recipes_seq2seq``, ``recipes_hf``) builds one training run the way its public authors
wrote it and hands back a :class:`RecipeRun`: the model, the optimizer the loop steps
(the recipe's own, or what ``wrap`` made of it), the recipe's LR schedule, the batch of
every step, its own training iteration :meth:`RecipeRun.train_step` (with the recipe's
gradient clip kept or removed) and a held-out loss read in ``eval()`` mode.
:meth:`RecipeRun.run` runs it for ``steps`` iterations, with one corrupted batch where
asked, and returns a :class:`RunOutcome`; ``train_step`` can be called on its own (to
time one iteration, or in a regression test).

The wrapper hook ``wrap(inner) -> optimizer`` is how a variant swaps the optimizer
without touching the recipe: ``None`` keeps the recipe's, ``lambda o: SafeOptimizer(o)``
wraps it. When the result is a :class:`~stableopt.SafeOptimizer`, the recipe reports its
loss to it (``SafeLoss`` around the recipe's loss where the loss is one call,
``opt.observe_loss`` where it is a composition).
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from stableopt import SafeOptimizer

__all__ = [
    "BATCH_FAULTS",
    "FAULTS",
    "FAULT_AT",
    "LR_FAULT",
    "RecipeRun",
    "RunOutcome",
    "StepLog",
    "TokenBatch",
    "Wrap",
    "apply_wrap",
    "check_steps",
    "corrupt_tensor",
    "describe_error",
    "fault_step",
    "embedding_fault",
]

#: ``wrap(inner optimizer) -> the optimizer the loop steps`` (``None``: the inner itself).
Wrap = Callable[[Optimizer], Optimizer]

#: ``healthy``: as written; ``nan_batch``: one batch mid-run holds a NaN; ``x1e3_batch``:
#: one batch mid-run is multiplied by 1e3; ``lr_10x``: the recipe's LR x10 all run.
FAULTS = ("healthy", "nan_batch", "x1e3_batch", "lr_10x")
BATCH_FAULTS = ("nan_batch", "x1e3_batch")
LR_FAULT = "lr_10x"
#: the corrupted batch comes at this share of the run
FAULT_AT = 0.4
#: how many interventions a run keeps in words (the first ones)
FIRST_EVENTS = 4


def fault_step(steps: int) -> int:
    """The step (counted from 1) whose batch a batch fault corrupts."""
    return max(1, round(FAULT_AT * steps))


def apply_wrap(inner: Optimizer, wrap: Wrap | None) -> tuple[Optimizer, SafeOptimizer | None]:
    """``(the optimizer the loop steps, the SafeOptimizer among it or None)``."""
    optimizer = inner if wrap is None else wrap(inner)
    return optimizer, optimizer if isinstance(optimizer, SafeOptimizer) else None


def corrupt_tensor(x: Tensor, kind: str) -> Tensor:
    """A copy of the float tensor ``x`` with the batch fault ``kind`` applied.

    ``nan_batch``: one NaN, in the first element (one bad sample value is what a corrupt
    record or a division by zero in preprocessing leaves); ``x1e3_batch``: every value
    times 1e3 (a unit or normalisation mistake in one shard).
    """
    if kind == "nan_batch":
        out = x.clone()
        out.view(-1)[0] = math.nan
        return out
    if kind == "x1e3_batch":
        return x * 1e3
    raise ValueError(f"kind must be one of {BATCH_FAULTS}, got {kind!r}")


class TokenBatch(NamedTuple):
    """A batch of token ids and its targets; ``fault`` is a batch fault to apply to the
    embedded tokens (``""``: none). Token ids cannot hold a NaN or be scaled, so for a
    token model the corrupted *input* is the embedded batch."""

    tokens: Tensor
    targets: Tensor
    fault: str = ""


@contextlib.contextmanager
def embedding_fault(embedding: nn.Module, kind: str) -> Iterator[None]:
    """Within the block, ``embedding``'s output has the batch fault ``kind`` applied
    (nothing when ``kind`` is ``""``)."""
    if not kind:
        yield
        return

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return corrupt_tensor(output, kind)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class StepLog:
    """What SafeOptimizer did on the steps of one run, read from ``opt.last_verdict``."""

    clipped: list[str] = field(default_factory=list)  # the first few clipped steps, in words
    clip_coefficients: list[float] = field(default_factory=list)  # every clipped step's

    def observe(self, safe: SafeOptimizer | None) -> None:
        """Read the step that just ran (host values: no sync)."""
        verdict = None if safe is None else safe.last_verdict
        if verdict is None or not verdict.is_clipped:
            return
        self.clip_coefficients.append(verdict.clip_coefficient)
        if len(self.clipped) < FIRST_EVENTS:
            threshold = verdict.clip_threshold
            self.clipped.append(
                f"{verdict.step} clip: norm {verdict.grad_norm:.4g} > threshold "
                f"{threshold if threshold is None else f'{threshold:.4g}'}"
                f"{' (emergency)' if verdict.is_emergency else ''}, "
                f"x{verdict.clip_coefficient:.3g}"
            )


@dataclass
class RunOutcome:
    """What :meth:`RecipeRun.run` saw."""

    initial: float  # held-out loss before the first step (eval mode)
    final: float  # held-out loss after the last step run (eval mode; NaN when poisoned)
    steps_run: int
    error: str  # "DivergenceError at step N: ...", "<exception type> at step N: ..." or ""
    seconds: float  # the training loop, without the two evaluations
    own_clips: int  # steps where the recipe's own clip scaled the gradients (-1: no clip)
    log: StepLog

    @property
    def died(self) -> bool:
        """A DivergenceError, or a non-finite final held-out loss."""
        return bool(self.error) or not math.isfinite(self.final)


class RecipeRun(ABC):
    """One built recipe: see the module docstring.

    Subclasses set the attributes below in ``__init__`` and write :meth:`batch`,
    :meth:`corrupt`, :meth:`train_step` and :meth:`held_out_loss`.
    """

    model: nn.Module
    inner: Optimizer  # the recipe's own optimizer
    optimizer: Optimizer  # what the loop steps: ``inner``, or what ``wrap`` made of it
    safe: SafeOptimizer | None  # the SafeOptimizer in ``optimizer``, if any
    steps: int  # the run's length (the LR schedule is laid out over it)
    lr: float  # the peak LR of the schedule
    clip: float  # the recipe's own max gradient norm (0: the recipe has no clip)
    keep_clip: bool  # the recipe's clip line is kept in :meth:`train_step`
    own_clips: int = 0
    #: the seed of the RNG state every held-out evaluation starts from (dropout that
    #: stays on in eval mode, such as Tacotron's prenet, reads the same mask every time)
    eval_seed: int = 12345

    @abstractmethod
    def batch(self, step: int) -> Any:
        """The batch of training step ``step`` (counted from 1): a function of the seed and step."""

    @abstractmethod
    def corrupt(self, batch: Any, kind: str) -> Any:
        """``batch`` with the batch fault ``kind`` (see :data:`BATCH_FAULTS`) applied."""

    @abstractmethod
    def train_step(self, batch: Any) -> Tensor:
        """One iteration of the recipe's own loop on ``batch``; returns the (detached) loss."""

    @abstractmethod
    def held_out_loss(self) -> float:
        """The recipe's loss on its fixed held-out set (called by :meth:`evaluate`, which puts
        the model in ``eval()`` mode under ``no_grad``)."""

    def clip_line(self, params: Iterable[Tensor]) -> None:
        """The recipe's ``clip_grad_norm_(params, clip)``, when kept; counts when it scales."""
        if not (self.keep_clip and self.clip > 0):
            return
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.own_clips += bool(norm > self.clip)  # a NaN norm does not count

    def evaluate(self) -> float:
        """:meth:`held_out_loss` in ``eval()`` mode, without gradients, from a fixed RNG state;
        then the model's mode and the caller's RNG state back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(self.eval_seed)
                return self.held_out_loss()
        finally:
            self.model.train(was_training)

    def run(self, fault: str = "healthy", steps: int | None = None) -> RunOutcome:
        """Train for ``steps`` iterations (default the run's own), the batch fault
        ``fault`` (if it is one) applied to the batch of :func:`fault_step`.

        A :class:`~stableopt.DivergenceError` ends the run and is recorded, not raised;
        so does any other exception from the training step (a crash, recorded by its type).
        """
        steps = self.steps if steps is None else steps
        bad_step = fault_step(self.steps) if fault in BATCH_FAULTS else 0
        initial = self.evaluate()
        log = StepLog()
        error, done = "", 0
        started = time.perf_counter()
        for t in range(1, steps + 1):
            batch = self.batch(t)
            if t == bad_step:
                batch = self.corrupt(batch, fault)
            try:
                self.train_step(batch)
            except Exception as exc:  # a DivergenceError, or a crash: recorded, not raised
                error = describe_error(exc, t)
                break
            log.observe(self.safe)
            done = t
        seconds = time.perf_counter() - started
        own = self.own_clips if self.keep_clip and self.clip > 0 else -1
        return RunOutcome(initial, self.evaluate(), done, error, seconds, own, log)


def describe_error(exc: BaseException, step: int) -> str:
    """``"DivergenceError at step 12: ..."`` (or the exception's type, for a crash)."""
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__} at step {step}: {first}"


def check_steps(steps: int) -> int:
    """``steps``, checked: an int >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps
