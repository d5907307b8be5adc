"""Nothing is lost: bad steps are skipped, corrupted weights rolled back, divergence bounded."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from stableopt import DivergenceError, Escalation, Rollback, SafeOptimizer
from stableopt.outcomes import SkipReason
from tests.helpers import (
    OPTIMIZERS,
    OptimizerInfo,
    backward,
    make_model,
    same_snapshot,
    snapshot,
    twin,
)

# Every test runs with the step decided on the host and on the device (conftest.py).
pytestmark = pytest.mark.usefixtures("decide_on")


def poison_grads(model: nn.Module, value: float) -> None:
    params = list(model.parameters())
    params[len(params) // 2].grad.view(-1)[0] = value


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"]
)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip1"])
def test_non_finite_grads_leave_weights_and_state_bit_identical(
    info: OptimizerInfo, value: float, clip: float | None
) -> None:
    model = make_model()
    opt = SafeOptimizer(info.build(model.parameters()), clip=clip)
    for step in range(4):
        before = snapshot(model, opt)
        opt.zero_grad()
        backward(model, step)
        if step in (0, 2):  # the first step (empty state) and a later one
            poison_grads(model, value)
            opt.step()
            assert same_snapshot(before, snapshot(model, opt)), f"step {step} changed weights/state"
        else:
            opt.step()
            assert not same_snapshot(before, snapshot(model, opt))
    stats = opt.stats()
    assert stats["skipped_steps"] == 2 and stats["good_steps"] == 2
    skips = [e for e in opt.events() if e.kind == "skip"]
    assert [e.step for e in skips] == [1, 3]
    assert skips[0].cause is SkipReason.NONFINITE_GRADS
    assert not math.isfinite(skips[0].data["grad_norm"])


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
def test_skipped_steps_match_a_bare_run_without_those_batches(info: OptimizerInfo) -> None:
    model = make_model()
    reference = twin(model)
    # the LR policies would (rightly) cut the LR after a NaN: compare the guard alone
    safe = SafeOptimizer(info.build(model.parameters()), clip=None, emergency_lr=None)
    bare = info.build(reference.parameters())
    bad_steps = {3, 4, 11}
    for step in range(16):
        safe.zero_grad()
        backward(model, step)
        if step in bad_steps:
            poison_grads(model, float("nan"))
        safe.step()
        if step not in bad_steps:
            bare.zero_grad()
            backward(reference, step)
            bare.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_adam_eps_zero_nan_weights_are_rolled_back() -> None:
    """Finite gradients can still corrupt weights: Adam with eps=0 meeting a zero gradient (0/0)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4))
    opt = SafeOptimizer(
        torch.optim.Adam([weight], lr=0.1, eps=0.0), rollback=Rollback(every_steps=2, scope="all")
    )
    for _ in range(3):
        weight.grad = torch.randn(4)
        opt.step()
    state_before = {k: v.clone() for k, v in opt.state[weight].items()}
    # a fresh Adam sees a zero gradient: m = v = 0, update 0/0
    fresh = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [fresh]})
    weight.grad, fresh.grad = torch.randn(4), torch.zeros(2)
    before_fresh = fresh.detach().clone()
    opt.step()
    assert torch.isfinite(weight).all() and torch.isfinite(fresh).all()
    assert opt.stats()["rollbacks"] == 1
    assert torch.equal(fresh, before_fresh)
    assert fresh not in opt.state or not opt.state[fresh]
    event = next(e for e in opt.events() if e.kind == "rollback")
    assert "non-finite weights" in event.reason
    # the snapshot was retaken when the group was added, i.e. at the state before this step
    assert torch.equal(opt.state[weight]["exp_avg"], state_before["exp_avg"])


class CorruptingSGD(torch.optim.SGD):
    """An optimizer whose update writes NaN into the weights on chosen calls (a bad kernel)."""

    def __init__(self, params: Any, corrupt_on: set[int] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.corrupt_on = corrupt_on or set()
        self.calls = 0
        self.corrupt_next = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        if self.calls in self.corrupt_on or self.corrupt_next:
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        self.calls += 1
        self.corrupt_next = False
        return loss


def test_rollback_restores_the_last_snapshot_exactly() -> None:
    model = make_model()
    reference = twin(model)
    opt = SafeOptimizer(
        CorruptingSGD(model.parameters(), corrupt_on={7}, lr=0.05, momentum=0.9),
        rollback=Rollback(every_steps=5, scope="all"),
        check_weights="every_step",
    )
    bare = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step in range(8):
        opt.zero_grad()
        backward(model, step)
        opt.step()
        if step < 5:  # the reference stops at the snapshot (after 5 good steps)
            bare.zero_grad()
            backward(reference, step)
            bare.step()
    assert opt.stats()["rollbacks"] == 1
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], bare.state[q]["momentum_buffer"])
    assert [e.data["snapshot_step"] for e in opt.events() if e.kind == "rollback"] == [5]


def test_same_device_snapshots_restore_too() -> None:
    model = make_model()
    opt = SafeOptimizer(
        CorruptingSGD(model.parameters(), corrupt_on={2}, lr=0.05),
        rollback=Rollback(every_steps=1, device="same", scope="all"),
        check_weights="every_step",
    )
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    assert opt.stats()["rollbacks"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_without_rollback_corrupted_weights_raise_at_once() -> None:
    model = make_model()
    opt = SafeOptimizer(
        CorruptingSGD(model.parameters(), corrupt_on={0}, lr=0.05),
        rollback=None,
        check_weights="every_step",
    )
    backward(model, 0)
    with pytest.raises(DivergenceError, match="rollback is off") as caught:
        opt.step()
    # the message is true about the weights: they are not the last good ones
    assert "The weights hold NaN/Inf values" in str(caught.value)
    assert "last good ones" not in str(caught.value)


@pytest.mark.parametrize(
    "info",
    [i for i in OPTIMIZERS if i.name in ("AdamW-foreach", "AdamW-fused", "SGD-forloop")],
    ids=repr,
)
def test_divergence_after_max_consecutive_failures_keeps_last_good_weights(
    info: OptimizerInfo,
) -> None:
    model = make_model()
    opt = SafeOptimizer(info.build(model.parameters()), max_consecutive_failures=3)
    for step in range(5):
        opt.zero_grad()
        backward(model, step)
        opt.step()
    good = snapshot(model, opt)
    for step in range(5, 7):
        opt.zero_grad()
        backward(model, step)
        poison_grads(model, float("nan"))
        opt.step()
    opt.zero_grad()
    backward(model, 7)
    poison_grads(model, float("inf"))
    with pytest.raises(DivergenceError) as caught:
        opt.step()
    error = caught.value
    assert "3 consecutive steps" in str(error) and "skipped_steps=3" in str(error)
    assert "step 8 skip" in str(error)
    assert error.stats["consecutive_failures"] == 3
    assert [e.kind for e in error.events][-1] == "divergence"
    assert same_snapshot(good, snapshot(model, opt))


def test_a_good_step_resets_the_failure_streak() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), max_consecutive_failures=2)
    for step in range(10):
        opt.zero_grad()
        backward(model, step)
        if step % 2:
            poison_grads(model, float("nan"))
        opt.step()
    assert opt.stats()["skipped_steps"] == 5 and opt.stats()["consecutive_failures"] == 1


FAULTS = st.lists(
    st.sampled_from(["ok", "ok", "ok", "nan_grad", "inf_grad", "nan_weights"]),
    min_size=5,
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=FAULTS,
    fused=st.booleans(),
    every=st.integers(1, 6),
    check_weights=st.sampled_from(["every_step", "lazy"]),
)
def test_random_fault_schedules_never_corrupt_the_model(
    schedule: list[str], fused: bool, every: int, check_weights: str
) -> None:
    """A reference model of what must happen, step by step.

    every_step: a corrupting update is rolled back in the same step. lazy: it is
    found at the next step (whose gradients are NaN) or before a snapshot is due,
    and rolled back then; in between only that one step shows non-finite weights.
    """
    model = make_model()
    inner = CorruptingSGD(model.parameters(), lr=0.05, momentum=0.9, fused=fused)
    opt = SafeOptimizer(
        inner,
        clip=1.0,
        rollback=Rollback(every_steps=every, scope="all"),
        check_weights=check_weights,  # type: ignore[arg-type]
        # the escalation (a rollback after 5 failures in a row, a stop after 3 restores
        # that fail again) is tested on its own: here every fault is met alone
        escalation=Escalation(
            rollback_after=len(schedule) + 1,
            max_consecutive_failures=len(schedule) + 1,
            max_restore_failures=len(schedule) + 1,
        ),
    )
    last_snapshot = snapshot(model, opt)
    good_steps = skips = rollbacks = 0
    corrupted = False  # lazy: the weights are NaN, to be found at the next step
    for step, fault in enumerate(schedule):
        before = snapshot(model, opt)
        opt.zero_grad()
        backward(model, step)
        if fault == "nan_grad":
            poison_grads(model, float("nan"))
        elif fault == "inf_grad":
            poison_grads(model, float("inf"))
        inner.corrupt_next = fault == "nan_weights"
        opt.step()
        after = snapshot(model, opt)
        if corrupted:  # NaN weights make NaN gradients: found now, whatever this step was
            rollbacks += 1
            corrupted = False
            assert same_snapshot(last_snapshot, after), "rollback did not restore the last snapshot"
        elif fault in ("nan_grad", "inf_grad"):
            skips += 1
            assert same_snapshot(before, after), f"a skipped step ({fault}) changed the model"
        elif fault == "nan_weights":
            snapshot_due = (good_steps + 1) % every == 0
            if check_weights == "every_step" or snapshot_due:
                rollbacks += 1
                assert same_snapshot(last_snapshot, after), "rollback did not restore the snapshot"
            else:  # lazy: counted as a good step until the next one finds it
                good_steps += 1
                corrupted = True
                assert not all(torch.isfinite(p).all() for p in model.parameters())
                continue
        else:
            good_steps += 1
            if good_steps % every == 0:
                last_snapshot = after
        assert all(torch.isfinite(p).all() for p in model.parameters())
    stats = opt.stats()
    assert (stats["skipped_steps"], stats["rollbacks"]) == (skips, rollbacks)
