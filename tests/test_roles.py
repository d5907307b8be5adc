"""Every stage slot takes any object with exactly the members of its role.

For each slot, a stand-in class is built with exactly the members
:func:`stableopt.roles.protocol_members` lists for the slot's role, each forwarding
to the built-in stage: a run with the stand-in in the slot must be bit-identical to the run
with the built-in stage itself, under faults that exercise every path (NaN gradients,
spikes, corrupting updates with a rollback and an LR cut, a checkpoint round trip). A
member the pipeline used beyond the role would raise ``AttributeError`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from stableopt import (
    EmergencyClip,
    EmergencyLR,
    Escalation,
    HotLR,
    Ledger,
    PlateauLR,
    Rollback,
    SafeOptimizer,
    SpikeGuard,
)
from stableopt.outcomes import Cause, EventKind, SkipReason
from stableopt.registry import ROLES, STAGE_MEMBERS
from stableopt.rerun import Rerun
from stableopt.roles import LRPolicy, SkipRule, protocol_members
from stableopt.testing.faults import FaultInjector, FaultSchedule, RegressionTask

BUILT_IN: dict[str, Callable[[], Any]] = {
    "emergency_clip": EmergencyClip,
    "spike": SpikeGuard,
    "emergency_lr": EmergencyLR,
    "hot_lr": HotLR,
    "plateau": lambda: PlateauLR(patience_steps=20, check_every_steps=5),
    "rollback": lambda: Rollback(every_steps=10),
    "escalation": Escalation,
    "rerun": Rerun,
    "ledger": Ledger,
}


def stand_in(slot: str, real: Any) -> Any:
    """An object of a new class with exactly the members of ``slot``'s role, forwarding
    each to ``real`` (attributes and properties as read-write properties)."""
    namespace: dict[str, Any] = {}
    for member in STAGE_MEMBERS[slot]:
        value = getattr(type(real), member, None)
        if member == "name":
            namespace["name"] = real.name
        elif callable(value) and not isinstance(value, property):

            def forward(self: Any, *args: Any, _m: str = member, **kwargs: Any) -> Any:
                return getattr(real, _m)(*args, **kwargs)

            namespace[member] = forward
        else:
            namespace[member] = property(
                lambda self, _m=member: getattr(real, _m),
                lambda self, value, _m=member: setattr(real, _m, value),
            )
    return type(f"StandIn_{slot}", (), namespace)()


def train(steps: int = 90, **slots: Any) -> tuple[list[Tensor], dict[str, Any], list[Any]]:
    """A run under faults of every kind, through a checkpoint round trip at step 50."""
    task = RegressionTask(seed=0)
    model = task.make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), **slots)
    schedule = FaultSchedule(
        {12: "nan_grad", 40: "grad_spike", 55: "nan_weights", 60: "nan_weights", 70: "inf_loss"}
    )
    with FaultInjector(schedule, opt) as injector:
        for step in range(1, steps + 1):
            injector.begin_step(step)
            x, y = injector.corrupt_batch(*task.batch(step))
            opt.tag_batch([step])

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                injector.corrupt_grads(model.parameters())
                return loss

            opt.step(closure)
            if step == 50:
                opt.load_state_dict(opt.state_dict())
    return [p.detach().clone() for p in model.parameters()], opt.stats(), opt.events()


@pytest.fixture(scope="module")
def reference() -> tuple[list[Tensor], dict[str, Any], list[Any]]:
    return train(**{slot: make() for slot, make in BUILT_IN.items()})


@pytest.mark.parametrize("slot", sorted(BUILT_IN))
def test_a_stand_in_with_exactly_the_roles_members_fills_the_slot(
    slot: str, reference: tuple[list[Tensor], dict[str, Any], list[Any]]
) -> None:
    stages = {name: make() for name, make in BUILT_IN.items()}
    stages[slot] = stand_in(slot, stages[slot])
    weights, stats, events = train(**stages)
    ref_weights, ref_stats, ref_events = reference
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights))
    assert {k: v for k, v in stats.items() if k != "transient_faults_by_device"} == {
        k: v for k, v in ref_stats.items() if k != "transient_faults_by_device"
    }
    assert [(e.step, e.kind, e.cause) for e in events] == [
        (e.step, e.kind, e.cause) for e in ref_events
    ]


def test_the_faults_exercise_every_path(
    reference: tuple[list[Tensor], dict[str, Any], list[Any]],
) -> None:
    _, stats, events = reference
    kinds = {e.kind for e in events}
    assert {EventKind.SKIP, EventKind.ROLLBACK, EventKind.LR_CUT} <= kinds
    assert stats["rollbacks"] >= 2 and stats["lr_changes"] >= 1


def test_every_slot_has_a_role_and_the_registry_checks_exactly_its_members() -> None:
    assert set(ROLES) == {*BUILT_IN, "skip_rules", "lr_policies"}
    for slot, role in ROLES.items():
        assert STAGE_MEMBERS[slot] == protocol_members(role)
        assert {"name", "observe", "state_dict", "load_state_dict"} <= set(STAGE_MEMBERS[slot])


@pytest.mark.parametrize("slot", sorted(BUILT_IN))
def test_a_stand_in_missing_a_member_is_refused_naming_it(slot: str) -> None:
    real = BUILT_IN[slot]()
    missing = STAGE_MEMBERS[slot][-1]
    incomplete = stand_in(slot, real)
    delattr(type(incomplete), missing)
    task = RegressionTask(seed=0)
    with pytest.raises(TypeError, match=missing):
        SafeOptimizer(torch.optim.SGD(task.make_model().parameters(), lr=0.1), **{slot: incomplete})


# -- skip rules and LR policies of your own ------------------------------------------------


class LossCeiling:
    """A skip rule: any loss above ``ceiling`` is skipped."""

    name = "loss_ceiling"

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.seen = 0

    def bound(self, signal: str) -> float | None:
        return self.ceiling if signal == "loss" else None

    def observe(self, numbers: Any) -> None:
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state_dict: Any) -> None:
        self.seen = int(state_dict["seen"])


class HalveAt:
    """An LR policy: the factor halves at a given step."""

    name = "halve"

    def __init__(self, step: int) -> None:
        self.at = step
        self.factor = 1.0
        self.min_lr = 0.0

    def observe(self, numbers: Any) -> None:
        if numbers.step == self.at:
            self.factor *= 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def load_state_dict(self, state_dict: Any) -> None:
        self.factor = float(state_dict["factor"])


def test_the_examples_have_exactly_the_roles_members() -> None:
    assert isinstance(LossCeiling(1.0), SkipRule) and isinstance(HalveAt(1), LRPolicy)
    assert {m for m in dir(LossCeiling) if not m.startswith("_")} - {"ceiling", "seen"} == set(
        STAGE_MEMBERS["skip_rules"]
    )


def test_a_skip_rule_of_your_own_skips_and_says_its_name() -> None:
    task = RegressionTask(seed=0)
    model = task.make_model()
    rule = LossCeiling(ceiling=50.0)
    opt = SafeOptimizer(  # the spike guard off: the rule alone judges the loss
        torch.optim.AdamW(model.parameters(), lr=1e-2), spike=None, skip_rules=[rule]
    )
    for step in range(1, 21):
        x, y = task.batch(step)
        if step == 10:
            y = y + 100.0  # a loss far above the ceiling
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
    skips = [e for e in opt.events() if e.kind == EventKind.SKIP]
    assert [(e.step, e.cause, e.labels["rule"]) for e in skips] == [
        (10, SkipReason.RULE, "loss_ceiling")
    ]
    assert opt.last_verdict is not None and rule.seen == 20
    assert "skip_rules/loss_ceiling" in opt.state_dict()["stableopt"]["stages"]


def test_an_lr_policy_of_your_own_multiplies_the_lr_and_its_changes_are_events() -> None:
    model = nn.Linear(4, 1)
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), lr_policies=[HalveAt(5)])
    seen = []
    for _ in range(8):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        seen.append(opt.effective_lr()[0])
    assert seen[:4] == [0.1] * 4 and seen[4:] == [0.05] * 4
    assert opt.param_groups[0]["lr"] == 0.1  # the schedule's LR is never written
    cut = next(e for e in opt.events() if e.kind == EventKind.LR_CUT)
    assert (cut.step, cut.cause, cut.labels["policy"]) == (5, Cause.POLICY, "halve")
    assert (cut.data["old_factor"], cut.data["new_factor"]) == (1.0, 0.5)


def test_skip_rules_and_lr_policies_are_checked() -> None:
    model = nn.Linear(4, 1)
    with pytest.raises(TypeError, match="bound"):
        SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), skip_rules=[HalveAt(1)])
    with pytest.raises(ValueError, match="distinct names"):
        SafeOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), lr_policies=[HalveAt(1), HalveAt(2)]
        )
    with pytest.raises(TypeError, match="list"):
        SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), skip_rules="loss")  # type: ignore[arg-type]
