"""Emergency clipping: explosions are clipped to half the threshold for a cool-down window."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stableopt import SafeOptimizer
from stableopt.outcomes import SkipReason
from stableopt.stages.base import StepNumbers
from stableopt.stages.emergency_clip import EmergencyClip
from tests.helpers import backward, batch, make_model

# Every test runs with the step decided on the host and on the device (conftest.py).
pytestmark = pytest.mark.usefixtures("decide_on")


def held_out_loss(model: nn.Module) -> float:
    with torch.no_grad():
        losses = [
            nn.functional.mse_loss(model(x), y) for x, y in (batch(10_000 + i) for i in range(4))
        ]
    return float(torch.stack(losses).mean())


def run(spike_at: int | None, steps: int = 150, factor: float = 1e6) -> tuple[float, SafeOptimizer]:
    model = make_model()
    # the spike guard would skip the spike and the LR policy cut the LR: test the clip alone
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=3e-3), clip=1.0, spike=None, emergency_lr=None
    )
    for step in range(steps):
        opt.zero_grad()
        backward(model, step)
        if step == spike_at:
            for p in model.parameters():
                p.grad.mul_(factor)
        opt.step()
    return held_out_loss(model), opt


def test_a_1e6_spike_is_clipped_counted_and_harmless() -> None:
    clean_loss, clean = run(None)
    spiked_loss, spiked = run(spike_at=99)  # 50 more steps after the spike
    assert clean.stats()["emergency_clips"] == 0
    stats = spiked.stats()
    assert stats["emergency_clips"] == 1
    event = next(e for e in spiked.events() if e.kind == "emergency_clip")
    assert event.step == 100 and event.data["grad_norm"] > 1e5
    assert event.data["clip_threshold"] == pytest.approx(0.5)
    assert abs(spiked_loss - clean_loss) <= 0.10 * clean_loss, (spiked_loss, clean_loss)


def test_without_emergency_the_spike_costs_more() -> None:
    """The reference: plain AdamW (no clip) takes the spike into its second moment."""
    clean_loss, _ = run(None)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        opt.zero_grad()
        backward(model, step)
        if step == 99:
            for p in model.parameters():
                p.grad.mul_(1e6)
        opt.step()
    spiked_loss, _ = run(spike_at=99)
    assert abs(spiked_loss - clean_loss) < abs(held_out_loss(model) - clean_loss)


def test_reduced_threshold_holds_for_the_cooldown_then_returns() -> None:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3),
        clip=2.0,
        emergency_clip=EmergencyClip(cooldown_steps=3, min_history=2),
    )
    thresholds = []
    for step in range(8):
        opt.zero_grad()
        backward(model, step)
        if step == 2:
            for p in model.parameters():
                p.grad.mul_(1e6)
        opt.step()
        thresholds.append(opt.stats()["clip_threshold"])
    assert thresholds == [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]


def test_skip_above_skips_garbage_norms() -> None:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3),
        clip=1.0,
        emergency_clip=EmergencyClip(skip_above=1e8),
    )
    backward(model, 0)
    for p in model.parameters():
        p.grad.mul_(1e12)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.stats()["skipped_steps"] == 1
    skip = next(e for e in opt.events() if e.kind == "skip")
    assert skip.cause is SkipReason.ABOVE_SKIP_LIMIT and skip.data["skip_above"] == 1e8


def test_emergency_state_resumes() -> None:
    emergency = EmergencyClip(cooldown_steps=5)
    for _ in range(8):
        emergency.observe(StepNumbers(1.0))
    emergency.observe(StepNumbers(5e3))
    restored = EmergencyClip(cooldown_steps=5)
    restored.load_state_dict(emergency.state_dict())
    assert restored.cooldown_left == 5 and restored.threshold == emergency.threshold == 10.0
    for norm in (1.0, 40.0, 1e4):
        assert restored.limit(math.inf, norm) == emergency.limit(math.inf, norm)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_the_emergency_threshold_is_relative_to_the_runs_own_level(scale: float) -> None:
    """10x the median of the recent accepted norms, whatever their size: a run whose healthy
    norm is 1e5 is never in an emergency, and a 20x jump is one at every scale."""
    emergency = EmergencyClip()
    norms = [scale * (1.0 + 0.1 * (i % 5)) for i in range(64)]
    for i, norm in enumerate(norms):
        assert emergency.limit(math.inf, norm) == math.inf, i  # healthy: never reduced
        emergency.observe(StepNumbers(norm))
    median = sorted(norms)[31]  # the lower median of 64
    assert emergency.threshold == pytest.approx(10.0 * median)
    assert emergency.limit(math.inf, 20 * scale) == pytest.approx(0.5 * 10.0 * median)
    assert emergency.limit(3.0 * scale, 20 * scale) == pytest.approx(1.5 * scale)


def test_an_absolute_threshold_stays_available() -> None:
    emergency = EmergencyClip(threshold=1000.0)
    assert emergency.threshold == 1000.0  # from the first step, without history
    assert emergency.limit(2.0, 2000.0) == 1.0 and emergency.limit(2.0, 999.0) == 2.0
    with pytest.raises(ValueError, match="skip_above"):
        EmergencyClip(threshold=1000.0, skip_above=10.0)
