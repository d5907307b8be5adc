"""Every torch LR scheduler drives SafeOptimizer exactly as it drives the bare optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from stableopt import SafeOptimizer
from tests.helpers import backward, make_model, twin

STEPS = 30

SCHEDULERS: dict[str, Callable[[Optimizer], object]] = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=7, gamma=0.5),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=STEPS),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda step: 1.0 / (1 + step)),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=8),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, start_factor=0.1, total_iters=5), lrs.ExponentialLR(o, gamma=0.9)],
        milestones=[5],
    ),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, patience=2, factor=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_gives_the_same_lrs_and_no_warnings(name: str) -> None:
    model = make_model()
    reference = twin(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safe = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), clip=None)
        bare = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
        runs = [(model, safe, SCHEDULERS[name](safe)), (reference, bare, SCHEDULERS[name](bare))]
        lrs_seen: list[list[float]] = [[], []]
        for step in range(STEPS):
            for i, (m, opt, sched) in enumerate(runs):
                opt.zero_grad()
                loss = backward(m, step)
                opt.step()
                if name == "ReduceLROnPlateau":
                    sched.step(1.0)  # type: ignore[attr-defined]  # a flat metric: it must reduce
                else:
                    sched.step()  # type: ignore[attr-defined]
                lrs_seen[i].append(opt.param_groups[0]["lr"])
                assert torch.isfinite(loss)
    assert lrs_seen[0] == lrs_seen[1]
    assert len(set(lrs_seen[0])) > 1, "the schedule never changed the LR"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert safe.optimizer.param_groups[0]["lr"] == lrs_seen[0][-1]
