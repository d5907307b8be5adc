"""LRBurst: a scheduled LR far above every LR the run has used is held back before the
update; the schedules people use are left alone, bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from stableopt import EventKind, LRBurst, SafeOptimizer
from stableopt.testing.faults import RegressionTask

STEPS = 300
Schedule = Callable[[torch.optim.Optimizer], Any]


def warmup_cosine(burst: float = 0.0, start: float = 0.5, length: float = 0.05) -> Schedule:
    """Linear warm-up over 5% of the run, cosine to 10%; ``burst``: the LR times that for
    ``length`` of the run from ``start`` (a schedule bug)."""

    def multiplier(t: int) -> float:
        warm = int(0.05 * STEPS)
        value = (t + 1) / warm if t < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * t / STEPS))
        if burst and int(start * STEPS) <= t < int((start + length) * STEPS):
            value *= burst
        return value

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier)


HEALTHY: dict[str, Schedule] = {
    "warmup_cosine": warmup_cosine(),
    "linear_warmup_from_1e-3_in_10": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=10),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
        ],
        milestones=[10],
    ),
    "sgdr_restarts": lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=40, T_mult=2
    ),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-2, total_steps=STEPS
    ),
    "step_decay": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=60, gamma=0.3),
    "cyclic": lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=1e-4, max_lr=1e-2, step_size_up=25
    ),
    # torchvision's reference stepped per epoch: LinearLR(0.01, total_iters=1), then cosine;
    # a 100x jump at the end of the first epoch (25 steps)
    "per_epoch_warmup_x100": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.01 if t < 25 else 0.5 * (1 + math.cos(math.pi * t / STEPS))
    ),
    # He et al.'s ResNet-110: a constant tenth of the LR, then the LR
    "constant_warmup_x10": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.1 if t < 100 else 1.0
    ),
}


def train(
    schedule: Schedule, seed: int, wrap: bool, steps: int = STEPS
) -> tuple[nn.Module, float, SafeOptimizer | None]:
    task = RegressionTask(seed=seed)
    model = task.make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = SafeOptimizer(inner, lr_policies=[LRBurst()]) if wrap else None
    scheduler = schedule(inner)
    for step in range(1, steps + 1):
        x, y = task.batch(step)
        (opt or inner).zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        (opt or inner).step()
        scheduler.step()
    with torch.no_grad():
        x, y = task.held_out()
        return model, float(nn.functional.mse_loss(model(x), y)), opt


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_the_schedules_people_use_are_left_alone(name: str) -> None:
    """Warm-up of any shape (a 1000x one in 10 steps, a per-epoch one that jumps 100x, a
    constant one that jumps 10x), cosine, SGDR restarts, one-cycle, step decay, cyclic: the
    factor stays 1, and the run is the bare AdamW's, bit for bit."""
    bare, _, _ = train(HEALTHY[name], 0, wrap=False)
    safe, _, opt = train(HEALTHY[name], 0, wrap=True)
    assert opt is not None
    assert opt.stats()["lr_changes"] == 0
    assert all(torch.equal(p, q) for p, q in zip(bare.parameters(), safe.parameters()))


@pytest.mark.parametrize("burst", [10.0, 100.0, 1000.0])
def test_an_lr_burst_is_held_back_before_it_lands(burst: float) -> None:
    """x10, x100 and x1000 for 5% of the run, from its middle: within 5% of the fault-free
    run (plain AdamW ends 1.2x-2.2x, 44x-112x and 5,500x-10,000x on these seeds)."""
    for seed in range(3):
        _, clean, _ = train(warmup_cosine(), seed, wrap=False)
        _, burnt, opt = train(warmup_cosine(burst), seed, wrap=True)
        assert opt is not None
        assert burnt <= 1.05 * clean, (seed, burnt / clean)
        cuts = [e for e in opt.events() if e.kind == EventKind.LR_CUT]
        recoveries = [e for e in opt.events() if e.kind == EventKind.LR_RECOVERY]
        assert [e.step for e in cuts] == [int(0.5 * STEPS) + 1]  # the burst's first update
        assert [e.step for e in recoveries] == [int(0.55 * STEPS) + 1]
        # against the largest LR the run trained with (the warm-up's peak): at the middle
        # of the cosine the schedule is 0.55 of it
        assert cuts[0].data["excess"] == pytest.approx(0.55 * burst, rel=1e-6)


def test_a_jump_that_persists_is_taken_after_the_hold() -> None:
    """After the schedule has decayed, a jump to 10x its peak that stays (a deliberate restart
    at a higher LR): held for 20% of the steps run so far, then let up by 2x a step."""
    jump = 100
    warmup_cosine_then_up = warmup_cosine()

    def schedule(opt: torch.optim.Optimizer) -> Any:
        first = warmup_cosine_then_up(opt)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: first.lr_lambdas[0](t) if t < jump else 10.0
        )

    _, _, opt = train(schedule, 0, wrap=True, steps=200)
    assert opt is not None
    (cut,) = [e for e in opt.events() if e.kind == EventKind.LR_CUT]
    (recovery,) = [e for e in opt.events() if e.kind == EventKind.LR_RECOVERY]
    assert cut.step == jump + 1
    held = recovery.step - cut.step
    assert 0.2 * jump <= held <= 0.2 * (jump + held) + 5  # the hold, then a few steps up
    assert opt.lr_factor == 1.0


def test_state_dict_round_trip() -> None:
    policy = LRBurst()
    for lr in [1e-3] * 25 + [5e-4] * 5 + [1e-1] * 3:  # a decay, then a 100x burst
        policy.before_update([lr])
    fresh = LRBurst()
    fresh.load_state_dict(policy.state_dict())
    assert fresh.state_dict() == policy.state_dict() and fresh.factor == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"ratio": 1.0}, ValueError), ({"min_steps": -1}, ValueError), ({"ratio": "4"}, TypeError)],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        LRBurst(**kwargs)
