"""Rerun triage: a failing step's closure is evaluated again on the same batch and RNG state.

A fault of the first evaluation only (what silent data corruption on a device looks like)
is a transient fault: the step goes on with the second evaluation's gradients, which must
be exactly those of a clean evaluation (compared with bare AdamW on the clean closure, with
dropout in the model, bit for bit). A bad batch fails twice and is skipped as reproducible.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from stableopt import SafeOptimizer
from stableopt.checkpoint import STATE_KEY

pytestmark = pytest.mark.usefixtures("decide_on")


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="stableopt")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)


def closure_for(
    model: nn.Module, opt: torch.optim.Optimizer, step: int, calls: list[int], fault: str = ""
) -> Callable[[], torch.Tensor]:
    """The step's closure; ``fault``: ``"first"`` corrupts its first evaluation only (a
    transient fault), ``"batch"`` every evaluation (a bad batch: NaN in the input)."""

    def closure() -> torch.Tensor:
        calls.append(step)
        opt.zero_grad()
        x, y = data(step)
        if fault == "batch":
            x = x.clone()
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        if fault == "first" and calls.count(step) == 1:
            loss = loss * math.inf  # the first evaluation's result is corrupted
        loss.backward()
        return loss

    return closure


def run(
    faults: dict[int, str], steps: int = 8, **options: object
) -> tuple[nn.Module, SafeOptimizer, list[int]]:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), **options)  # type: ignore[arg-type]
    calls: list[int] = []
    torch.manual_seed(123)  # the dropout masks
    for step in range(1, steps + 1):
        opt.step(closure_for(model, opt, step, calls, faults.get(step, "")))
    return model, opt, calls


def bare(steps: int = 8, skip: set[int] | None = None) -> nn.Module:
    """AdamW on the clean closures, the same dropout draws (a skipped step draws its masks
    and does not update, as a skip does)."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    calls: list[int] = []
    torch.manual_seed(123)
    for step in range(1, steps + 1):
        closure = closure_for(model, opt, step, calls)
        if skip and step in skip:
            closure()
            continue
        opt.step(closure)
    return model


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_transient_fault_is_recovered_with_the_rerun_gradients_bit_for_bit() -> None:
    model, opt, calls = run({4: "first"})
    assert same(model, bare())  # as if the fault never happened, dropout included
    assert calls == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # only the failing step ran twice
    stats = opt.stats()
    assert stats["transient_faults"] == 1 and stats["skipped_steps"] == 0
    assert stats["transient_faults_by_device"] == {"cpu": 1}
    (event,) = [e for e in opt.events() if e.kind == "transient_fault"]
    assert event.step == 4 and "possible silent data corruption) on cpu" in event.reason
    assert "the loss is NaN/Inf" in event.reason and "re-run's gradients" in event.reason
    assert opt.last_step is not None  # the last step, 8, updated
    assert opt.last_step.status == "updated"


def test_a_bad_batch_fails_twice_and_is_skipped_as_reproducible() -> None:
    model, opt, calls = run({4: "batch"})
    assert same(model, bare(skip={4}))
    assert calls.count(4) == 2
    stats = opt.stats()
    assert stats["transient_faults"] == 0 and stats["skipped_steps"] == 1
    (skip,) = [e for e in opt.events() if e.kind == "skip"]
    assert skip.step == 4 and skip.data["reproduced"] == 1.0


def test_healthy_steps_never_rerun_and_equal_the_wrapper_without_triage() -> None:
    with_rerun, opt, calls = run({})
    without, _, calls_without = run({}, rerun=None)
    assert calls == calls_without == list(range(1, 9))
    assert same(with_rerun, without) and same(with_rerun, bare())
    assert opt.stats()["transient_faults"] == 0


def test_without_triage_a_transient_fault_is_a_skip() -> None:
    model, opt, calls = run({4: "first"}, rerun=None)
    assert calls.count(4) == 1 and opt.stats()["skipped_steps"] == 1
    assert opt.stats()["transient_faults_by_device"] == {}
    assert same(model, bare(skip={4}))


def test_without_a_closure_nothing_can_rerun() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = data(1)
    (nn.functional.mse_loss(model(x), y) * math.inf).backward()
    opt.step()
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["transient_faults"] == 0


def test_the_counts_survive_a_state_dict_round_trip_and_old_checkpoints_load() -> None:
    model, opt, _ = run({2: "first", 5: "first"})
    state = copy.deepcopy(opt.state_dict())
    fresh = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    fresh.load_state_dict(state)
    assert fresh.stats()["transient_faults"] == 2
    assert fresh.stats()["transient_faults_by_device"] == {"cpu": 2}
    del state[STATE_KEY]["stages"]["rerun"]
    del state[STATE_KEY]["stage_classes"]["rerun"]
    older = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    older.load_state_dict(state)  # a checkpoint from before the triage existed
    assert older.stats()["transient_faults_by_device"] == {}
