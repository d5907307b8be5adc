"""The stage protocol: every built-in stage follows it, and objects of the user's own, checked by
their members rather than their class, plug into the pipeline."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import stableopt
from stableopt import (
    AGCClip,
    ClipPolicy,
    EmergencyClip,
    EmergencyLR,
    FixedClip,
    PercentileClip,
    PlateauLR,
    Rollback,
    SafeOptimizer,
    SpikeGuard,
    Stage,
    StepNumbers,
    ZScoreClip,
)
from tests.helpers import backward, make_model

BUILT_IN = [
    ZScoreClip(),
    PercentileClip(),
    AGCClip(),
    FixedClip(1.0),
    EmergencyClip(),
    SpikeGuard(),
    EmergencyLR(),
    PlateauLR(),
    Rollback(),
]


@pytest.mark.parametrize("stage", BUILT_IN, ids=lambda s: type(s).__name__)
def test_every_built_in_stage_follows_the_protocol(stage: Any) -> None:
    assert isinstance(stage, Stage)
    assert isinstance(stage.name, str) and stage.name
    stage.observe(StepNumbers(1.0, 2.0, True, 1))
    state = stage.state_dict()
    stage.load_state_dict(state)
    if hasattr(stage, "max_norm"):
        assert isinstance(stage, ClipPolicy)


class CapAtFirst:
    """A clip policy of a user's own, not derived from ClipPolicy: clip to the first norm."""

    name = "cap_at_first"

    def __init__(self) -> None:
        self.first: float | None = None
        self.seen: list[int] = []

    def max_norm(self, grad_norm: Any) -> Any:
        return math.inf if self.first is None else self.first

    def observe(self, numbers: StepNumbers) -> None:
        self.seen.append(numbers.step)
        if numbers.is_accepted and self.first is None:
            self.first = numbers.grad_norm

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.first = state_dict["first"]


@pytest.mark.usefixtures("decide_on")
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_clip_policy_of_ones_own_clips_like_clip_grad_norm(fused: bool) -> None:
    model, reference = make_model(), make_model()
    impl = {"fused": True} if fused else {"foreach": True}
    policy = CapAtFirst()
    opt = SafeOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2, **impl), clip=policy)
    bare = torch.optim.Adam(reference.parameters(), lr=1e-2, **impl)
    first = None
    clipped = 0
    for step in range(12):
        for m, o in ((model, opt), (reference, bare)):
            o.zero_grad()
            backward(m, step)
            for p in m.parameters():
                p.grad.mul_(1.0 + step)  # growing norms: every step after the first clips
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), first or math.inf)
        clipped += first is not None and float(norm) + 1e-6 > first
        first = first or float(norm)
        opt.step()
        bare.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert policy.seen == list(range(1, 13))  # observed every step, with its number
    assert opt.stats()["total_clips"] == clipped >= 8
    assert opt.state_dict()["stableopt"]["stages"]["clip"] == {"first": first}


class NeverSpike:
    """A spike stage of a user's own: never skips, counts what it was shown."""

    name = "never"
    cut_after, rollback_after, z_threshold = 3, 6, 6.0
    watch_loss = True

    def __init__(self) -> None:
        self.accepted = 0

    def bound(self, signal: str) -> float | None:
        return None

    def watches(self, signal: str) -> bool:
        return True

    def evidence(self, signal: str, value: float) -> dict[str, float]:
        return {}

    def level(self, signal: str) -> float | None:
        return None

    def skip_bound(self, signal: str) -> float | None:
        return None

    def clear(self) -> None:
        self.accepted = 0

    def observe(self, numbers: StepNumbers) -> None:
        self.accepted += numbers.is_accepted

    def state_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.accepted = int(state_dict["accepted"])


def test_a_stage_of_ones_own_takes_the_place_of_the_spike_guard() -> None:
    model = make_model()
    spike = NeverSpike()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), spike=spike)
    for step in range(20):
        opt.zero_grad()
        loss = backward(model, step)
        opt.observe_loss(loss * (1e6 if step == 10 else 1.0))  # a spike it lets through
        opt.step()
    assert spike.accepted == 20 and opt.stats()["skipped_steps"] == 0
    assert opt.state_dict()["stableopt"]["stages"]["spike"] == {"accepted": 20}


@pytest.mark.parametrize(
    ("slot", "value", "missing"),
    [
        ("clip", object(), "max_norm"),
        ("spike", object(), "bound"),
        ("spike", ZScoreClip(), "bound"),  # a stage, but not one for this slot
        ("emergency_lr", SpikeGuard(), "update"),
        ("rollback", "often", "'often'"),
    ],
)
def test_a_stage_without_the_members_of_its_slot_is_refused(
    slot: str, value: Any, missing: str
) -> None:
    model = make_model()
    with pytest.raises(TypeError, match=f"{slot} must be") as error:
        SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), **{slot: value})
    assert missing in str(error.value)


def test_the_extension_points_are_exported() -> None:
    for name in ("Sink", "Recommendation", "Stage", "ClipPolicy", "StepNumbers", "StepVerdict"):
        assert name in stableopt.__all__ and hasattr(stableopt, name)
