"""One formula, two ways: every generic helper and every decision gives the same value for a
Python float (the host decides) and a 0-dim tensor (the device decides), NaN and Inf included.

The float results are the reference: plain Python arithmetic written out here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stableopt._num import clamp, finite_or, is_within, lerp, select, where
from stableopt.gate import Bound, Gate
from stableopt.stages import EmergencyClip, PercentileClip, SpikeGuard, StepNumbers, ZScoreClip
from stableopt.verdict import SkipReason, StepVerdict

VALUES = [0.0, 1e-30, 0.5, 1.0, 2.5, 3.0, 1e30, math.inf, -math.inf, math.nan, -2.0]


def same(a: float | bool, b: torch.Tensor) -> bool:
    value = b.item()
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(value)
    return value == a


@pytest.mark.parametrize("x", VALUES)
def test_helpers_agree_on_floats_and_tensors(x: float) -> None:
    t = torch.tensor(x, dtype=torch.float64)
    assert same(clamp(x, 0.5, 2.5), clamp(t, 0.5, 2.5))  # type: ignore[arg-type]
    assert same(clamp(x, None, 2.5), clamp(t, None, 2.5))  # type: ignore[arg-type]
    assert same(clamp(x, 0.5, None), clamp(t, 0.5, None))  # type: ignore[arg-type]
    assert same(finite_or(x, 7.0), finite_or(t, 7.0))  # type: ignore[arg-type]
    assert same(is_within(x, -1.0, 2.5), is_within(t, -1.0, 2.5))  # type: ignore[arg-type]
    assert same(where(x > 1.0, 10.0, 20.0), where(t > 1.0, 10.0, 20.0))  # type: ignore[arg-type]
    assert same(select(x > 1.0, lambda: x * 2, -1.0), select(t > 1.0, lambda: t * 2, -1.0))  # type: ignore[arg-type]
    if math.isfinite(x) and abs(x) < 1e20:
        for weight in (0.0, 0.25, 0.5, 0.75, 1.0):
            got = lerp(torch.tensor(1.5, dtype=torch.float64), t, weight)
            assert float(got) == pytest.approx(lerp(1.5, x, weight), rel=1e-15, abs=1e-300)


def test_the_float_forms_are_the_plain_python_arithmetic() -> None:
    assert clamp(math.nan, 0.0, 1.0) != clamp(math.nan, 0.0, 1.0)  # NaN stays NaN
    assert clamp(5.0, 0.0, 1.0) == 1.0 and clamp(-5.0, 0.0, 1.0) == 0.0
    assert finite_or(math.nan, 3.0) == finite_or(math.inf, 3.0) == 3.0
    assert not is_within(math.nan, -math.inf, math.inf)
    assert lerp(1.0, 3.0, 0.25) == 1.5 and lerp(1.0, 3.0, 0.75) == 2.5
    # select never evaluates the branch it does not choose on the host
    assert select(False, lambda: 1.0 / 0.0, 4.0) == 4.0


BOUNDS = (
    Bound("grad_norm_spike", "grad_norm", 5.0),
    Bound("loss_spike", "loss", 2.0),
    Bound("emergency_clip", "grad_norm", 3.0),  # not a skip
)


@pytest.mark.parametrize("grad_norm", [v for v in VALUES if not v < 0])  # a norm is >= 0 or NaN
@pytest.mark.parametrize("loss", [None, 1.0, 2.0, 2.5, math.nan, math.inf, -math.inf, -1e30])
def test_the_skip_decision_is_one_formula(grad_norm: float, loss: float | None) -> None:
    f32 = torch.float32
    loss_dtype = None if loss is None else f32
    on_host = Gate.passes(grad_norm, loss, BOUNDS, f32, loss_dtype)
    t_loss = None if loss is None else torch.tensor(loss, dtype=f32)
    on_device = Gate.passes(torch.tensor(grad_norm, dtype=f32), t_loss, BOUNDS, f32, loss_dtype)
    assert isinstance(on_host, bool) and isinstance(on_device, torch.Tensor)
    assert bool(on_device) is on_host
    # the reference, written out: finite, at most every skip bound (the emergency one is not)
    norm32 = float(torch.tensor(grad_norm, dtype=f32))
    expected = math.isfinite(norm32) and norm32 <= 5.0
    if loss is not None:
        expected = expected and math.isfinite(loss) and abs(loss) < 3.4e38 and loss <= 2.0
    assert on_host is expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: ZScoreClip(warmup_steps=3),
        lambda: ZScoreClip(warmup_steps=3, clip_factor=0.7, min_norm=0.1, max_norm=50.0),
        lambda: PercentileClip(30.0, window_steps=6),
        lambda: PercentileClip(100.0, window_steps=3, min_norm=2.0),
    ],
)
def test_clip_thresholds_with_the_emergency_rule_are_one_formula(make) -> None:  # type: ignore[no-untyped-def]
    policy = make()
    emergency = EmergencyClip(threshold=20.0, cooldown_steps=2)
    gate = Gate(policy, emergency, None)
    norms = [1.0, 1.2, 0.8, 1.1, 30.0, 1.0, 0.9, 400.0, 1.0, math.nan, 1.3, 1.05, 25.0, 1.0]
    for norm in norms:
        on_host = gate.max_norm(norm)
        on_device = gate.max_norm(torch.tensor(norm, dtype=torch.float64))
        assert isinstance(on_host, float)
        assert float(on_device) == pytest.approx(on_host, rel=1e-15), norm  # type: ignore[arg-type]
        numbers = StepNumbers(norm, is_accepted=math.isfinite(norm))
        policy.observe(numbers)
        emergency.observe(numbers)


def test_spike_bounds_are_rounded_to_the_dtype_they_are_compared_in() -> None:
    guard = SpikeGuard(window_steps=8, min_history=4, watch_loss=False)
    for value in (1.0, 1.1, 0.9, 1.05):
        guard.observe(StepNumbers(value))
    raw = guard.bound("grad_norm")
    assert raw is not None
    (bound,) = Gate(None, None, guard).bounds(torch.float32, None)
    assert bound.value == float(torch.tensor(raw, dtype=torch.float32))
    # a float32 norm equal to the rounded bound is not above it, on the host or the device
    at_bound = torch.tensor(bound.value, dtype=torch.float32)
    assert Gate.passes(bound.value, None, (bound,), torch.float32, None) is True
    assert bool(Gate.passes(at_bound, None, (bound,), torch.float32, None)) is True


def test_a_verdict_is_typed_and_frozen() -> None:
    verdict = StepVerdict(step=1, grad_norm=1.0, loss=None, is_accepted=True, skip_reason=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.is_accepted = False  # type: ignore[misc]
    with pytest.raises(AttributeError):
        verdict.is_acepted  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(TypeError):
        StepVerdict(step=1, grad_norm=1.0, loss=None, is_accepted=True, skip_reson=None)  # type: ignore[call-arg]
    skipped = dataclasses.replace(verdict, is_accepted=False, skip_reason=SkipReason.LOSS_SPIKE)
    assert skipped.is_spike and not verdict.is_spike
    assert skipped.numbers == StepNumbers(1.0, None, False, 1)
