"""The stability benchmark's methods: plain AdamW, the usual guards and SafeOptimizer.

Each method is a runner class: its optimizer, its loss and what one step does.
The baselines are plain AdamW, AdamW with ``clip_grad_norm_(1.0)`` (and with a skip
of non-finite steps), ZClip, AutoClip and OLMo-core's SkipStepAdamW; the peers, two
tools a user would pick instead, each wired as its README shows: ARC (the
``arc-training`` package: ``arc.Controller(model, optimizer, scheduler=...)``,
``action = controller.step(loss)`` after ``backward``, ``optimizer.step()`` unless
``action.should_skip``) and StabilityGuard (``GuardedOptimizer(AdamW, model)`` with
its defaults, whose ``step()`` skips a step on a NaN or a 10x per-layer gradient
spike); then SafeOptimizer with defaults, and with one stage off at a time (the
ablation).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from benchmarks.stability_scenarios import _WeightedLoss
from stableopt.loss import SafeLoss
from stableopt.monitor import Monitor
from stableopt.optimizer import SafeOptimizer
from stableopt.stages.lr_burst import LRBurst
from stableopt.stages.rollback import Rollback

__all__ = [
    "ABLATIONS",
    "BASELINES",
    "METHODS",
    "PEERS",
    "arc_status",
    "olmo_status",
    "stabilityguard_status",
    "unavailable_methods",
    "zclip_status",
]


def _trim(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The hand-written length fix of the plain methods: cut both to the shorter time axis
    (sequences only: class logits against labels have no time axis to cut)."""
    if pred.dim() < 3:
        return pred, target
    n = min(pred.shape[-1], target.shape[-1])
    return pred[..., :n], target[..., :n]


class _Runner:
    """One method on one model: its optimizer, its loss and what a step does."""

    name = ""

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.base_loss = loss
        self.optimizer: Optimizer = self.make_optimizer(lr)
        self.skipped = 0

    def make_optimizer(self, lr: float) -> Optimizer:
        return torch.optim.AdamW(self.params, lr=lr)

    @property
    def inner(self) -> Optimizer:
        return self.optimizer

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.base_loss(*_trim(pred, target))

    def step(self, loss: Tensor) -> None:
        self.optimizer.step()

    def counters(self) -> tuple[int, int, int]:
        """(steps skipped, rollbacks, LR cuts)."""
        return self.skipped, 0, 0

    def attach_scheduler(self, scheduler: Any) -> None:
        """The run's LR scheduler, built on :attr:`optimizer` (for tools that adjust it)."""

    def close(self) -> None:
        """Release what the method holds (hooks, threads, files) after the run."""


class _Plain(_Runner):
    name = "adamw"


class _Clip(_Runner):
    name = "adamw+clip"

    def step(self, loss: Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()


class _ClipSkip(_Runner):
    name = "adamw+clip+skip"

    def step(self, loss: Tensor) -> None:
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if not (math.isfinite(float(loss.detach())) and math.isfinite(float(norm))):
            self.skipped += 1
            self.optimizer.zero_grad()
            return
        self.optimizer.step()


class _ZClip(_Runner):
    name = "zclip"

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        from zclip import ZClip

        super().__init__(model, lr, loss)
        self.zclip = ZClip()  # the package's defaults (alpha 0.97, z 2.5, max_grad_norm 1.0)

    def step(self, loss: Tensor) -> None:
        self.zclip.step(self.model)
        self.optimizer.step()


class _AutoClip(_Runner):
    """AutoClip (Seetharaman et al. 2020): clip to the 10th percentile of all past norms."""

    name = "autoclip"

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        super().__init__(model, lr, loss)
        self.history: list[float] = []

    def step(self, loss: Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.history.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        threshold = float(torch.tensor(self.history).quantile(0.1))
        torch.nn.utils.clip_grad_norm_(self.params, threshold)
        self.optimizer.step()


class _Olmo(_Runner):
    """OLMo-core's SkipStepAdamW, fed the loss and the pre-clip norm as its trainer does
    (``clip_grad_norm_(1.0)``, then ``latest_loss`` / ``latest_grad_norm`` before ``step``)."""

    name = "olmo-skipstep"

    def make_optimizer(self, lr: float) -> Optimizer:
        from olmo_core.optim import SkipStepAdamW

        optimizer: Optimizer = SkipStepAdamW(self.params, lr=lr)
        return optimizer

    def step(self, loss: Tensor) -> None:
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        opt: Any = self.optimizer
        opt.latest_loss = loss.detach()
        opt.latest_grad_norm = norm.detach()
        opt.step()
        self.skipped += int(float(opt.step_skipped))


class _Arc(_Runner):
    """ARC (``arc-training``), its README's loop. The run's ``LambdaLR`` is handed to the
    controller, as its configuration section shows for runs with a scheduler, so that
    ARC's LR cuts scale the scheduler's base LRs instead of being overwritten by it.
    ``verbose=False`` only silences its log lines."""

    name = "arc"

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        super().__init__(model, lr, loss)
        self.controller: Any = None
        self.rollbacks = 0
        self.cuts = 0

    def attach_scheduler(self, scheduler: Any) -> None:
        import arc

        self.controller = arc.Controller(
            self.model, self.optimizer, scheduler=scheduler, verbose=False
        )

    def step(self, loss: Tensor) -> None:
        if self.controller is None:
            self.attach_scheduler(None)
        action = self.controller.step(loss)
        self.rollbacks += int(action.rolled_back)
        self.cuts += int(action.lr_reduced)
        if action.should_skip:
            self.skipped += 1
            return
        self.optimizer.step()

    def counters(self) -> tuple[int, int, int]:
        return self.skipped, self.rollbacks, self.cuts

    def close(self) -> None:
        if self.controller is not None:
            self.controller.close()


class _StabilityGuard(_Runner):
    """StabilityGuard's ``GuardedOptimizer(AdamW, model)`` with its README defaults
    (``spike_threshold=10.0``, ``nan_action="skip"``). Its spike reports go to a
    temporary folder instead of ``./sg_logs`` and its box-drawn alerts (always printed)
    to nowhere; ``verbose=False`` only silences the periodic summary line."""

    name = "stabilityguard"

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        import tempfile

        from stabilityguard import GuardedOptimizer

        super().__init__(model, lr, loss)
        self._logs = tempfile.TemporaryDirectory(prefix="sg_logs_")
        self.guard = GuardedOptimizer(self.optimizer, model, log_dir=self._logs.name, verbose=False)

    def step(self, loss: Tensor) -> None:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            self.guard.step()

    def counters(self) -> tuple[int, int, int]:
        return int(self.guard.total_skips), 0, 0

    def close(self) -> None:
        self.guard.close()
        self._logs.cleanup()


class _Safe(_Runner):
    name = "safe"
    options: dict[str, Any] = {}

    def make_optimizer(self, lr: float) -> Optimizer:
        self.safe = SafeOptimizer(
            torch.optim.AdamW(self.params, lr=lr),
            monitor=Monitor(max_events=1_000_000),
            **copy.deepcopy(self.options),  # stage objects hold state: a fresh copy per run
        )
        # SafeLoss wraps the task's own loss (a layout it knows: F.cross_entropy, mse); the
        # per-batch weight of the poisoned batches is applied after it, and the weighted
        # loss is what the optimizer is told, as every other method's guard sees it
        raw = getattr(self.base_loss, "base", self.base_loss)
        self.safe_loss = SafeLoss(raw, optimizer=self.safe, observe=False)
        return self.safe

    @property
    def inner(self) -> Optimizer:
        return self.safe.optimizer

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        loss: Tensor = self.safe_loss(pred, target)
        weight = float(getattr(self.base_loss, "weight", 1.0))
        if weight != 1.0:
            loss = loss * weight
        if torch.is_grad_enabled():
            self.safe.observe_loss(loss.detach())
        return loss

    def counters(self) -> tuple[int, int, int]:
        stats = self.safe.stats()
        cuts = sum(e.kind in ("lr_cut", "plateau") for e in self.safe.events())
        return int(stats["skipped_steps"]), int(stats["rollbacks"]), cuts


def _safe_variant(name: str, **options: Any) -> type[_Runner]:
    variant: type[_Runner] = type(f"_Safe_{name}", (_Safe,), {"name": name, "options": options})
    return variant


BASELINES: tuple[type[_Runner], ...] = (_Plain, _Clip, _ClipSkip, _ZClip, _AutoClip, _Olmo)
PEERS: tuple[type[_Runner], ...] = (_Arc, _StabilityGuard)
ABLATIONS: tuple[type[_Runner], ...] = (
    _safe_variant("safe-no_clip", clip=None),
    _safe_variant("safe-zscore", clip="zscore"),
    _safe_variant("safe-no_spike", spike=None),
    _safe_variant("safe-no_emergency_lr", emergency_lr=None),
    _safe_variant("safe-no_hot_lr", hot_lr=None),
    _safe_variant("safe-plateau", plateau="default"),
    _safe_variant("safe-no_rollback", rollback=None),
    _safe_variant("safe-check_weights_off", check_weights="off"),
    _safe_variant("safe-check_weights_lazy", check_weights="lazy"),
    _safe_variant("safe-rollback_all", rollback=Rollback(scope="all")),
    _safe_variant("safe-rollback_every10", rollback=Rollback(every_steps=10)),
    _safe_variant("safe-lr_burst", lr_policies=[LRBurst()]),
)
_ALL: tuple[type[_Runner], ...] = (*BASELINES, *PEERS, _Safe, *ABLATIONS)
METHODS: dict[str, type[_Runner]] = {m.name: m for m in _ALL}


def olmo_status() -> str | None:
    """``None`` when OLMo-core's SkipStepAdamW can be used here, else why not."""
    try:
        from olmo_core.optim import SkipStepAdamW

        SkipStepAdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    except Exception as error:  # any failure to import or build: report it, do not fake it
        return f"{type(error).__name__}: {error}"
    return None


def zclip_status() -> str | None:
    """``None`` when the ``zclip`` package can be used here, else why not."""
    try:
        from zclip import ZClip

        ZClip()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def arc_status() -> str | None:
    """``None`` when ARC (``arc-training``) can be used here, else why not."""
    try:
        import arc

        model = nn.Linear(2, 1)
        arc.Controller(model, torch.optim.AdamW(model.parameters()), verbose=False).close()
    except Exception as error:
        return f"{type(error).__name__}: {error} (pip install --no-deps arc-training)"
    return None


def stabilityguard_status() -> str | None:
    """``None`` when StabilityGuard can be used here, else why not."""
    try:
        import tempfile

        from stabilityguard import GuardedOptimizer

        model = nn.Linear(2, 1)
        with tempfile.TemporaryDirectory() as folder:
            GuardedOptimizer(
                torch.optim.AdamW(model.parameters()), model, log_dir=folder, verbose=False
            ).close()
    except Exception as error:
        return f"{type(error).__name__}: {error} (pip install --no-deps stabilityguard)"
    return None


def unavailable_methods() -> dict[str, str]:
    """Baselines and peers whose package is missing here, and why (see
    ``benchmarks/requirements*.txt``)."""
    status = {
        "olmo-skipstep": olmo_status(),
        "zclip": zclip_status(),
        "arc": arc_status(),
        "stabilityguard": stabilityguard_status(),
    }
    return {method: why for method, why in status.items() if why is not None}
