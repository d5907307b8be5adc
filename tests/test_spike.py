"""The loss-spike guard: robust-z decisions against a numpy reference, exact skips, escalation.

The reference (:func:`reference_spikes`) is written out here with numpy from the
definition in ``stableopt/spike.py``: a sliding window of the last ``window``
*accepted* finite values per signal, the median and MAD of the window, the scale
``max(1.4826 MAD, 0.01 |median|)``, a spike when ``z > z_threshold`` once the
window holds ``min_history`` values; before that (early rule), from 3 values on, a
spike when the median is positive and ``x > early_ratio * median``. Convention: for
an even number of values the median is the LOWER of the two middle values
(``torch.nanmedian``'s), see ``test_even_window_uses_the_lower_median`` and
``test_the_early_rule_uses_the_lower_median``.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stableopt import DivergenceError, Rollback, SafeOptimizer, SpikeGuard, StepNumbers
from stableopt.gate import Gate
from stableopt.outcomes import Cause, EventKind, SkipReason
from stableopt.testing.faults import RegressionTask
from tests.helpers import (
    OPTIMIZERS,
    OptimizerInfo,
    backward,
    make_model,
    same_snapshot,
    scale_grads,
    set_first_grad,
    snapshot,
)

# Every test runs with the step decided on the host and on the device (conftest.py).
pytestmark = pytest.mark.usefixtures("decide_on")


# ---------------------------------------------------------------------------------
# the reference


def _lower_median(values: np.ndarray) -> float:
    ordered = np.sort(values)
    return float(ordered[(len(ordered) - 1) // 2])


@dataclass
class Verdict:
    """The reference decision of one step."""

    spikes: dict[str, bool]
    z: dict[str, float]

    @property
    def is_spike(self) -> bool:
        return any(self.spikes.values())


def _local_level(values: np.ndarray, log_floor: float | None) -> tuple[float, float]:
    """The median of the last 5 values carried 3 steps on by the median step, and the
    step-to-step noise: 1.4826 MAD of the successive differences over sqrt(2), floored."""
    steps = np.diff(values)
    drift = _lower_median(steps)
    spread = 1.4826 * _lower_median(np.abs(steps - drift))
    moves = np.abs(steps[steps != 0])  # a signal that mostly stands still: its step size
    if len(moves):
        spread = max(spread, 1.4826 * _lower_median(moves))
    spread /= math.sqrt(2)
    level = _lower_median(values[-5:]) + 3.0 * drift
    floor = log_floor if log_floor is not None else max(0.01 * abs(level), 1e-12)
    return level, max(spread, floor)


def reference_spikes(
    steps: Sequence[dict[str, float]],
    window: int,
    z_threshold: float,
    min_history: int,
    *,
    early_ratio: float | None,
    scale: str = "auto",
) -> list[Verdict]:
    """Per step: which signals are spikes, judged against the accepted history only.

    A step is accepted when no signal is a spike and every signal is finite; only
    then do its values enter the history (a NaN never does). The robust z is
    reported once ``min_history`` values are in the window (NaN before): against the
    local level in units of the step-to-step noise (see ``_local_level``), on the log
    of the values when the window and the value are positive, on the values
    themselves otherwise. A gradient norm no higher than the 90th percentile of the last
    32 accepted ones is never a spike (the run has just been there).
    """
    history: dict[str, list[float]] = {}
    verdicts = []
    for values in steps:
        spikes, zs = {}, {}
        for name, x in values.items():
            past = np.asarray(history.get(name, [])[-window:], dtype=np.float64)
            recent = np.sort(past[-32:])
            reached = (
                name == "grad_norm" and len(recent) and x <= recent[int(0.9 * (len(recent) - 1))]
            )
            if len(past) >= min_history and scale != "linear" and (past > 0).all() and x > 0:
                level, spread = _local_level(np.log(past), math.log(1.01))
                zs[name] = (math.log(x) - level) / spread if math.isfinite(x) else math.nan
                spikes[name] = math.isfinite(x) and bool(zs[name] > z_threshold) and not reached
            elif len(past) >= min_history:
                level, spread = _local_level(past, None)
                zs[name] = (x - level) / spread
                # a non-finite value is skipped as such, never called a spike
                spikes[name] = math.isfinite(x) and bool(zs[name] > z_threshold) and not reached
            elif len(past) >= 3 and early_ratio is not None:
                # early rule: a plain ratio to the (lower) median, positive medians only
                median = _lower_median(past)
                zs[name] = math.nan
                spikes[name] = math.isfinite(x) and median > 0 and x > early_ratio * median
            else:
                zs[name], spikes[name] = math.nan, False
        verdict = Verdict(spikes, zs)
        if not verdict.is_spike and all(math.isfinite(x) for x in values.values()):
            for name, x in values.items():
                history.setdefault(name, []).append(x)
        verdicts.append(verdict)
    return verdicts


def as_float32(x: float) -> float:
    """The value the guard stores (its window is float32)."""
    return float(np.float32(x))


# ---------------------------------------------------------------------------------
# recorded sequences


def record_clean_run(steps: int = 160) -> tuple[list[float], list[float]]:
    """Loss and total gradient norm of a plain AdamW run on the helpers' MLP."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad()
        losses.append(float(backward(model, step)))
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        opt.step()
    return losses, norms


LOSSES, NORMS = record_clean_run()


def with_faults(values: list[float], faults: dict[int, float]) -> list[float]:
    """``values`` with entries multiplied by a factor (or replaced by NaN/Inf)."""
    out = list(values)
    for i, factor in faults.items():
        out[i] = factor if not math.isfinite(factor) else out[i] * factor
    return out


def lognormal_with_bursts() -> list[float]:
    rng = np.random.default_rng(0)
    values = rng.lognormal(0.0, 0.3, 300)
    for i, factor in {50: 8.0, 51: 5.0, 120: 20.0, 200: 9.0, 201: 9.0, 202: 9.0}.items():
        values[i] *= factor
    values[100] = np.nan
    values[150] = np.inf
    return [float(v) for v in values]


def near_constant() -> list[float]:
    """A flat signal: the 1% floor decides (7% above is a spike at z=6, 5% is not)."""
    rng = np.random.default_rng(1)
    values = 2.0 + 1e-5 * rng.standard_normal(80)
    values[40] = 2.0 * 1.05
    values[60] = 2.0 * 1.07
    values[61] = np.nan
    values[62] = 2.0 * 1.07  # the NaN did not enter: still judged against the flat window
    return [float(v) for v in values]


# Early faults (before min_history=32): n < 3 at step 2 (accepted), a spike right after
# a NaN (step 7), a 50x rise that is no 100x over the median (step 10); later ones for
# the robust rule.
EARLY_FAULTS = {2: 1e4, 3: 1e4, 5: 1e3, 6: math.nan, 7: 1e3, 10: 50.0, 28: 1e6, 40: 30.0, 70: 50.0}


def lognormal_with_early_bursts() -> list[float]:
    values = lognormal_with_bursts()
    values[10] *= 40.0  # above 10x the median
    values[12] *= 3.0  # not
    return values


def negative_signal() -> list[float]:
    """A loss that lives below 0 (an NLL can): the early rule never fires on it."""
    rng = np.random.default_rng(2)
    values = -5.0 + 0.1 * rng.standard_normal(80)
    values[4] = 1000.0  # x > 100 * median (-500) would be true: the median is not positive
    values[50] = 5.0
    values[60] = 5.0
    return [float(v) for v in values]


SEQUENCES: dict[str, tuple[list[float], dict[str, Any]]] = {
    # recorded loss with spikes, a NaN and a spike right after the NaN (OLMo-core's
    # rolling mean/std would be NaN for the whole window after it)
    "recorded_loss": (
        with_faults(LOSSES, {40: 30.0, 70: math.nan, 72: 40.0, 100: 8.0, 101: 8.0, 130: 0.01}),
        {"window_steps": 32, "min_history": 16},
    ),
    "recorded_grad_norm": (
        with_faults(NORMS, {35: 20.0, 36: 50.0, 90: math.nan, 91: 25.0, 120: 1e4}),
        {"window_steps": 64, "min_history": 32},
    ),
    "lognormal_bursts": (lognormal_with_bursts(), {"window_steps": 16, "min_history": 8}),
    "lognormal_bursts_defaults": (lognormal_with_bursts(), {}),
    "near_constant": (near_constant(), {"window_steps": 32, "min_history": 10}),
    "low_threshold": (with_faults(LOSSES, {50: math.nan}), {"z_threshold": 1.5}),
    "early_spikes": (with_faults(LOSSES, EARLY_FAULTS), {}),
    "early_spikes_early_ratio_none": (with_faults(LOSSES, EARLY_FAULTS), {"early_ratio": None}),
    "early_ratio_10": (lognormal_with_early_bursts(), {"early_ratio": 10.0}),
    "negative_signal": (negative_signal(), {"window_steps": 32, "min_history": 16}),
}

# decisions the reference must reproduce: a spike right after a NaN (the NaN kept out
# of the window) and the 1% floor of a flat signal
MUST: dict[str, dict[int, bool]] = {
    "recorded_loss": {40: True, 70: False, 72: True},
    "recorded_grad_norm": {36: True, 90: False, 91: True, 120: True},
    "lognormal_bursts": {50: True, 100: False, 120: True, 150: False},
    "near_constant": {40: False, 60: True, 61: False, 62: True},
    "early_spikes": {2: False, 3: True, 5: True, 6: False, 7: True, 10: False, 28: True},
    "early_spikes_early_ratio_none": {3: False, 5: False, 7: False, 28: False},
    "early_ratio_10": {10: True, 12: False},
    "negative_signal": {4: False, 50: True},
}


def drive_guard(guard: SpikeGuard, steps: Sequence[dict[str, float]]) -> list[dict[str, bool]]:
    """Feed a SpikeGuard as the pipeline does: each watched value against the bound the gate
    takes from it (rounded to float32, the values' dtype), then the accepted step observed."""
    gate = Gate(None, None, guard)
    decisions = []
    for values in steps:
        loss = values.get("loss")
        grad_norm = values.get("grad_norm", 1.0)
        bounds = {b.signal: b.value for b in gate.bounds(torch.float32, torch.float32)}
        flags = {}
        for signal, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is not None and guard.watches(signal):
                bound = bounds.get(signal)
                flags[signal] = bound is not None and math.isfinite(value) and value > bound
        is_finite = all(math.isfinite(v) for v in values.values())
        guard.observe(StepNumbers(grad_norm, loss, is_finite and not any(flags.values())))
        decisions.append(flags)
    return decisions


@pytest.mark.parametrize("scale", ["linear", "auto"])
@pytest.mark.parametrize("signal", ["loss", "grad_norm"])
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_decisions_equal_the_numpy_reference(name: str, signal: str, scale: str) -> None:
    """Both scales against the numpy reference; the sequences were built for 6 robust
    standard deviations on the raw scale (their ``MUST`` points), the log scale sees
    fewer of their spikes (its tail is the run's multiplicative noise)."""
    raw, options = SEQUENCES[name]
    values = [as_float32(v) for v in raw]
    options = {"z_threshold": 6.0, **options}
    guard = SpikeGuard(
        **options,
        scale=scale,
        watch_loss=signal == "loss",
        watch_grad_norm=signal == "grad_norm",
    )
    steps = [{signal: v} for v in values]
    got = drive_guard(guard, steps)
    expected = reference_spikes(
        steps,
        guard.window_steps,
        guard.z_threshold,
        guard.min_history,
        early_ratio=guard.early_ratio,
        scale=scale,
    )
    assert [d[signal] for d in got] == [v.spikes[signal] for v in expected]
    assert sum(v.is_spike for v in expected) >= (2 if scale == "linear" else 0), "no spikes"
    for index, is_spike in MUST.get(name, {}).items() if scale == "linear" else ():
        assert got[index][signal] is is_spike, index  # the points each sequence is for
    # skipped and non-finite values never entered the history
    state = guard.state_dict()
    accepted = [
        v for v, verdict in zip(values, expected) if not verdict.is_spike and math.isfinite(v)
    ]
    assert state[f"{signal}_count"] == len(accepted)
    window = state[signal].numpy()
    assert np.isfinite(window[: min(len(accepted), guard.window_steps)]).all()
    assert sorted(window[np.isfinite(window)].tolist()) == sorted(accepted[-guard.window_steps :])


def test_both_signals_together_equal_the_reference() -> None:
    """Loss and gradient norm watched together: a spike in either rejects both values."""
    loss = with_faults(LOSSES, {40: 30.0, 70: math.nan, 90: 10.0})
    norms = with_faults(NORMS, {50: 30.0, 51: 30.0, 90: 1.0, 110: math.inf})
    steps = [{"loss": as_float32(a), "grad_norm": as_float32(b)} for a, b in zip(loss, norms)]
    guard = SpikeGuard(window_steps=32, min_history=16, z_threshold=6.0, scale="linear")
    got = drive_guard(guard, steps)
    expected = reference_spikes(steps, 32, 6.0, 16, early_ratio=guard.early_ratio, scale="linear")
    assert got == [v.spikes for v in expected]
    spike_steps = {i for i, v in enumerate(expected) if v.is_spike}
    assert {40, 50, 51, 90} <= spike_steps and not {70, 110} & spike_steps
    # the z-scores too, not only the decisions
    guard = SpikeGuard(window_steps=32, min_history=16, z_threshold=6.0, scale="linear")
    for values, verdict in zip(steps, expected):
        if math.isfinite(verdict.z["loss"]):
            z = guard.zscore("loss", values["loss"])
            assert z == pytest.approx(verdict.z["loss"], rel=1e-5)
        drive_guard(guard, [values])


def test_even_window_uses_the_lower_median() -> None:
    """History [4, 1, 3, 2]: the level is the lower median of the last values, 2 (numpy's
    median would be 2.5); the steps [-3, 2, -1] have the lower median -1 (the drift) and
    deviations [2, 3, 0] of lower median 2: level 2 + 3 x (-1) = -1, noise 1.4826 x 2 /
    sqrt(2). So x = 11.8 is at z = 6.1 (a spike), while with numpy's median it would be 5.8."""
    guard = SpikeGuard(
        window_steps=8,
        min_history=4,
        z_threshold=6.0,
        scale="linear",
        watch_grad_norm=False,
        early_ratio=None,
    )
    drive_guard(guard, [{"loss": v} for v in (4.0, 1.0, 3.0, 2.0)])
    noise = 1.4826 * 2 / math.sqrt(2)
    assert guard.zscore("loss", 11.8) == pytest.approx((11.8 - (2.0 - 3.0)) / noise, rel=1e-12)
    assert (11.8 - (np.median([4, 1, 3, 2]) - 3.0)) / noise < 6.0
    assert drive_guard(guard, [{"loss": 11.8}]) == [{"loss": True}]


def test_only_upward_outliers_and_only_after_min_history() -> None:
    guard = SpikeGuard(
        window_steps=8,
        min_history=5,
        z_threshold=6.0,
        scale="linear",
        watch_grad_norm=False,
        early_ratio=None,
    )
    assert (
        drive_guard(guard, [{"loss": v} for v in (1.0, 1.1, 0.9, 1.0, 1e6)])
        == [{"loss": False}] * 5
    )  # 4 values in the window when 1e6 arrives: z inactive (and 1e6 was accepted)
    assert guard.state_dict()["loss_count"] == 5
    # the early rule (default) catches it: 1e6 > 100 x the median 1.0
    guard = SpikeGuard(
        window_steps=8, min_history=5, z_threshold=6.0, scale="linear", watch_grad_norm=False
    )
    assert drive_guard(guard, [{"loss": v} for v in (1.0, 1.1, 0.9, 1.0, 1e6)]) == [
        *[{"loss": False}] * 4,
        {"loss": True},
    ]
    assert guard.state_dict()["loss_count"] == 4
    guard = SpikeGuard(
        window_steps=8, min_history=5, z_threshold=6.0, scale="linear", watch_grad_norm=False
    )
    drive_guard(guard, [{"loss": v} for v in (1.0, 1.1, 0.9, 1.0, 1.05)])
    assert drive_guard(guard, [{"loss": 1e-6}, {"loss": 100.0}]) == [
        {"loss": False},
        {"loss": True},
    ]


def test_the_early_rule_uses_the_lower_median() -> None:
    """History [1, 2, 3, 4]: lower median 2 -> 240 > 100 x 2 is a spike (numpy's 2.5
    would put the bar at 250); the robust rule is not active yet (min_history=8)."""
    guard = SpikeGuard(
        window_steps=8, min_history=8, z_threshold=6.0, scale="linear", watch_grad_norm=False
    )
    drive_guard(guard, [{"loss": v} for v in (1.0, 2.0, 3.0, 4.0)])
    assert drive_guard(guard, [{"loss": 240.0}, {"loss": 199.0}]) == [
        {"loss": True},
        {"loss": False},  # <= 100 x 2: accepted
    ]
    assert 240.0 <= 100 * np.median([1, 2, 3, 4])
    # 3 values are enough, 2 are not
    guard = SpikeGuard(
        window_steps=8, min_history=8, z_threshold=6.0, scale="linear", watch_grad_norm=False
    )
    assert drive_guard(guard, [{"loss": v} for v in (1.0, 1.0, 1e6, 1e6)]) == [
        *[{"loss": False}] * 3,
        {"loss": True},
    ]


def fast_start(steps: int = 60, seed: int = 3) -> list[dict[str, float]]:
    """Healthy early training: the loss falls 10x in 10 steps, the gradient norm rises
    10x in 10 steps (and, in the other signal, jumps 30x at step 3), with 20% noise."""
    rng = np.random.default_rng(seed)
    noise = np.exp(0.2 * rng.standard_normal((steps, 3)))
    out = []
    for t in range(steps):
        loss = 2.0 * 10.0 ** (-min(t, 10) / 10) * (1.0 - 0.002 * max(t - 10, 0))
        rise = 0.05 * 10.0 ** (min(t, 10) / 10)
        jump = 0.01 * (30.0 if t >= 3 else 1.0)
        out.append(
            {
                "loss": as_float32(loss * noise[t, 0]),
                "grad_norm": as_float32(rise * noise[t, 1]),
                "jump": as_float32(jump * noise[t, 2]),
            }
        )
    return out


@pytest.mark.parametrize("norm", ["grad_norm", "jump"])
def test_a_fast_healthy_start_is_never_flagged(norm: str) -> None:
    steps = [{"loss": v["loss"], "grad_norm": v[norm]} for v in fast_start()]
    assert (
        steps[10]["loss"] < 0.2 * steps[0]["loss"]
        and steps[12]["grad_norm"] > 4 * steps[0]["grad_norm"]
    )
    guard = SpikeGuard()  # defaults: early rule up to 32 values, robust z after
    got = drive_guard(guard, steps)
    assert got == [{"loss": False, "grad_norm": False}] * len(steps)
    expected = reference_spikes(steps, 128, 6.0, 32, early_ratio=guard.early_ratio)
    assert not any(v.is_spike for v in expected)


def test_early_ratio_none_restores_the_old_behaviour() -> None:
    """Without the early rule nothing is flagged before min_history (the 1e3-1e6x
    values are accepted into the history), as before the rule existed."""
    steps = [{"loss": as_float32(x)} for x in with_faults(LOSSES, EARLY_FAULTS)]
    old = drive_guard(SpikeGuard(early_ratio=None, watch_grad_norm=False), steps)
    assert not any(d["loss"] for d in old[:33])  # 32 finite values before step 33
    expected = reference_spikes(steps, 128, SpikeGuard().z_threshold, 32, early_ratio=None)
    assert [d["loss"] for d in old] == [v.spikes["loss"] for v in expected]
    new = drive_guard(SpikeGuard(watch_grad_norm=False), steps)
    assert [i for i, d in enumerate(new[:33]) if d["loss"]] == [3, 5, 7, 28]


def test_the_reason_names_the_rule_that_flagged_the_value() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    opt = SafeOptimizer(torch.optim.SGD([weight], lr=0.1), clip=None, emergency_lr=None)
    for loss in [2.0, 1.0, 4.0, 1000.0]:  # the 4th: 500x the median (2.0) of the first 3
        weight.grad = torch.full((3,), 0.01)
        opt.observe_loss(loss)
        opt.step()
    (skip,) = [e for e in opt.events() if e.kind == "skip"]
    assert skip.step == 4
    assert skip.cause is SkipReason.LOSS_SPIKE and skip.data["loss"] == 1000
    assert (skip.data["ratio"], skip.data["history"], skip.data["early_ratio"]) == (500, 3, 100)


# ---------------------------------------------------------------------------------
# the same decisions through SafeOptimizer


def _ids(infos: list[OptimizerInfo]) -> list[str]:
    return [repr(i) for i in infos]


ADAMW = [i for i in OPTIMIZERS if i.name in ("AdamW-foreach", "AdamW-fused")]


@pytest.mark.parametrize("info", ADAMW, ids=_ids(ADAMW))
def test_safe_optimizer_skips_exactly_the_reference_spikes(info: OptimizerInfo) -> None:
    model = make_model()
    opt = SafeOptimizer(  # clipping off: a gradient-norm spike is skipped, not clipped
        info.build(model.parameters()),
        clip=None,
        spike=SpikeGuard(window_steps=32, min_history=16, z_threshold=6.0),
    )
    grad_faults = {45: 30.0, 80: 1e3, 81: 1e3, 100: 0.01}
    loss_faults = {60: 50.0, 70: math.nan, 73: 40.0}  # observed loss only: grads stay normal
    recorded = []
    for step in range(130):
        opt.zero_grad()
        loss = backward(model, step)
        scale_grads(model, grad_faults.get(step, 1.0))
        observed = loss * loss_faults[step] if step in loss_faults else loss
        if step == 70:
            observed = torch.tensor(math.nan)
        opt.observe_loss(observed)
        skips_before = opt.stats()["spike_skips"]
        opt.step()
        recorded.append(
            (
                {"loss": as_float32(float(observed)), "grad_norm": opt.stats()["grad_norm"]},
                opt.stats()["spike_skips"] > skips_before,
            )
        )
    expected = reference_spikes(
        [values for values, _ in recorded],
        32,
        6.0,
        16,
        early_ratio=opt.spike.early_ratio,  # type: ignore[union-attr]
    )
    assert [skipped for _, skipped in recorded] == [v.is_spike for v in expected]
    spike_steps = {i for i, v in enumerate(expected) if v.is_spike}
    # the injected ones (the per-batch loss of this task has a few natural outliers too)
    assert {45, 60, 73, 80, 81} <= spike_steps and 70 not in spike_steps
    stats = opt.stats()
    assert stats["spike_skips"] == len(spike_steps)
    assert stats["skipped_steps"] == len(spike_steps) + 1  # + the NaN loss
    causes = {e.step - 1: e for e in opt.events() if e.kind == "skip"}
    assert causes.keys() == spike_steps | {70}
    assert causes[45].cause is SkipReason.GRAD_NORM_SPIKE
    assert causes[60].cause is SkipReason.LOSS_SPIKE and causes[60].data["z"] > 6.0
    assert causes[70].cause is SkipReason.NONFINITE_LOSS  # a non-finite skip, not a spike


# ---------------------------------------------------------------------------------
# a spike skip changes nothing

SKIP_VARIANTS = [
    i
    for i in OPTIMIZERS
    if i.name in ("AdamW-foreach", "AdamW-fused", "AdamW-forloop", "SGD-fused", "Adam-foreach")
]


@pytest.mark.parametrize("signal", ["grad_norm", "loss"])
@pytest.mark.parametrize("info", SKIP_VARIANTS, ids=_ids(SKIP_VARIANTS))
def test_a_spike_skip_leaves_weights_and_state_bit_identical(
    info: OptimizerInfo, signal: str
) -> None:
    model = make_model()
    # defaults; a gradient-norm spike is skipped when clipping is off (else it is clipped)
    clip: Any = None if signal == "grad_norm" else "auto"
    opt = SafeOptimizer(info.build(model.parameters()), clip=clip)
    for step in range(40):  # past min_history=32
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        opt.step()
    assert opt.stats()["spike_skips"] == 0
    opt.zero_grad()
    loss = backward(model, 40)
    # far out on the log scale even early in training, when the loss still falls fast
    if signal == "grad_norm":
        scale_grads(model, 1e3)
    else:
        loss = loss * 1e4
    opt.observe_loss(loss)
    before = snapshot(model, opt)
    opt.step()
    assert same_snapshot(before, snapshot(model, opt))
    stats = opt.stats()
    assert stats["spike_skips"] == 1 and stats["skipped_steps"] == 1 and stats["good_steps"] == 40
    assert stats["lr_changes"] == 0  # a spike is a bad input: never an LR cut
    event = opt.events()[-1]
    assert event.step == 41 and event.kind == "skip"
    assert event.cause is (
        SkipReason.LOSS_SPIKE if signal == "loss" else SkipReason.GRAD_NORM_SPIKE
    )
    # the next, normal step runs
    opt.zero_grad()
    opt.observe_loss(backward(model, 41))
    opt.step()
    assert not same_snapshot(before, snapshot(model, opt))


@pytest.mark.parametrize("signal", ["grad_norm", "loss"])
@pytest.mark.parametrize("info", SKIP_VARIANTS, ids=_ids(SKIP_VARIANTS))
def test_an_early_spike_is_skipped_and_leaves_weights_and_state_bit_identical(
    info: OptimizerInfo, signal: str
) -> None:
    """Defaults: a 1e4x spike at step 5 (4 values in the window, long before min_history=32
    and the clip's warm-up) is skipped by the early rule (a gradient-norm spike: with
    clipping off; with it on, it is clipped: see the test after)."""
    model = make_model()
    clip: Any = None if signal == "grad_norm" else "auto"
    opt = SafeOptimizer(info.build(model.parameters()), clip=clip)
    for step in range(4):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        opt.step()
    opt.zero_grad()
    loss = backward(model, 4)
    if signal == "grad_norm":
        scale_grads(model, 1e4)
    else:
        loss = loss * 1e4
    opt.observe_loss(loss)
    before = snapshot(model, opt)
    opt.step()
    assert same_snapshot(before, snapshot(model, opt))
    stats = opt.stats()
    assert stats["spike_skips"] == 1 and stats["skipped_steps"] == 1 and stats["good_steps"] == 4
    skip = next(e for e in opt.events() if e.kind == "skip")
    assert skip.step == 5
    assert skip.cause is (SkipReason.LOSS_SPIKE if signal == "loss" else SkipReason.GRAD_NORM_SPIKE)
    state = opt.spike.state_dict()  # type: ignore[union-attr]
    assert state["loss_count"] == state["grad_norm_count"] == 4  # the spike did not enter
    # the next, normal step runs
    opt.zero_grad()
    opt.observe_loss(backward(model, 5))
    opt.step()
    assert not same_snapshot(before, snapshot(model, opt))
    assert opt.stats()["good_steps"] == 5


def test_with_early_ratio_none_an_early_spike_goes_through() -> None:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), spike=SpikeGuard(early_ratio=None)
    )
    for step in range(6):
        opt.zero_grad()
        loss = backward(model, step)
        opt.observe_loss(loss * 1e4 if step == 4 else loss)
        opt.step()
    stats = opt.stats()
    assert stats["spike_skips"] == 0 and stats["skipped_steps"] == 0 and stats["good_steps"] == 6


# ---------------------------------------------------------------------------------
# escalation


def escalating_run(
    faults: dict[int, float | str],
    steps: int,
    max_consecutive_failures: int | None = None,
    clip: Any = None,
) -> tuple[nn.Module, SafeOptimizer, dict[int, Any]]:
    """20 good steps (snapshots after good steps 8 and 16), then ``faults``: a factor
    for the gradients (a spike) or ``"nan"``; a snapshot of weights and state per step.
    Clipping is off unless ``clip`` says: gradient-norm spikes are then skipped."""
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        clip=clip,
        spike=SpikeGuard(window_steps=16, min_history=8),
        rollback=Rollback(every_steps=8),
        max_consecutive_failures=max_consecutive_failures,
    )
    saved: dict[int, Any] = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        fault = faults.get(step)
        if fault == "nan":
            set_first_grad(model, math.nan)
        elif fault is not None:
            scale_grads(model, float(fault))
        opt.step()
        saved[step] = snapshot(model, opt)
    return model, opt, saved


def test_spikes_in_a_row_at_one_level_become_the_new_level() -> None:
    """A persistent x1e3 jump of the gradients (a loss re-weighting): three skips, then the
    level is the run's new normal; no LR cut, no rollback, and the updates run again."""
    _, opt, saved = escalating_run(dict.fromkeys(range(21, 41), 1e3), 40)
    events = [(e.step, e.kind) for e in opt.events()]
    assert events == [(21, "skip"), (22, "skip"), (23, "skip"), (23, "new_level")]
    new_level = next(e for e in opt.events() if e.kind == "new_level")
    assert new_level.cause is Cause.SPIKES_AT_ONE_LEVEL and new_level.data["spikes"] == 3
    for step in (21, 22, 23):  # the suspect steps changed nothing
        assert same_snapshot(saved[step], saved[20])
    assert not same_snapshot(saved[24], saved[23])  # the 4th runs
    stats = opt.stats()
    assert stats["skipped_steps"] == stats["spike_skips"] == 3 and stats["new_levels"] == 1
    assert stats["rollbacks"] == 0 and stats["lr_changes"] == 0 and stats["lr_factor"] == 1.0
    # the windows restarted from the new level: the 3 skipped norms and the accepted ones since
    state = opt.spike.state_dict()  # type: ignore[union-attr]
    assert state["grad_norm_count"] == 3 + 17
    assert opt.escalation.state.value == "healthy"


def test_spikes_of_unrelated_sizes_are_no_level_and_then_the_state_is_restored() -> None:
    """x1e4, x1e7, x1e4, ...: separate bad batches, not one level; five failed steps in a row
    say the state fails: the snapshot is restored and the LR cut, once."""
    faults: dict[int, float | str] = {21: 1e4, 22: 1e7, 23: 1e4, 24: 1e7, 25: 1e4}
    _, opt, saved = escalating_run(faults, 30)
    kinds = [(e.step, e.kind) for e in opt.events()]
    assert kinds[:5] == [(21, "skip"), (22, "skip"), (23, "skip"), (24, "skip"), (25, "rollback")]
    assert (25, "lr_cut") in kinds and not any(k == "new_level" for _, k in kinds)
    rollback = next(e for e in opt.events() if e.kind == "rollback")
    assert rollback.cause is Cause.FAILED_STEPS and rollback.data["failures"] == 5
    assert (
        rollback.labels["failed_for"] == "grad_norm_spike" and rollback.data["snapshot_step"] == 16
    )
    assert same_snapshot(saved[25], saved[16]) and not same_snapshot(saved[20], saved[16])
    stats = opt.stats()
    assert stats["rollbacks"] == 1 and stats["lr_factor"] == 0.1
    assert stats["consecutive_failures"] == 0 and opt.escalation.state.value == "recovering"


def test_failures_past_the_budget_raise_divergence_naming_the_cause() -> None:
    with pytest.raises(DivergenceError) as caught:
        escalating_run(dict.fromkeys(range(21, 40), "nan"), 40, max_consecutive_failures=8)
    error = caught.value
    assert error.stats["consecutive_failures"] == 8 and error.stats["steps"] == 28
    assert error.stats["rollbacks"] == 1 and error.stats["spike_skips"] == 0  # at the 5th
    assert error.events[-1].kind == "divergence"
    assert "8 consecutive steps were skipped or rolled back" in str(error)


def test_isolated_spikes_between_healthy_steps_never_add_up() -> None:
    """A x1e5 spike every 4th step for 200 steps: 50 skips, each alone; nothing escalates."""
    faults: dict[int, float | str] = {s: 1e5 for s in range(24, 221, 4)}
    _, opt, _ = escalating_run(faults, 221)
    stats = opt.stats()
    assert stats["skipped_steps"] == stats["spike_skips"] == len(faults)
    assert stats["rollbacks"] == 0 and stats["lr_changes"] == 0 and stats["new_levels"] == 0


def test_with_a_clip_policy_a_gradient_norm_spike_is_clipped_to_the_spike_bound() -> None:
    """With a clip policy on (the default), a gradient-norm spike with an ordinary loss, less
    than ``clip_within`` times the norm's level, is clipped (to the level, or lower by the
    emergency clip) instead of skipped; the event says so, with the z-score. The update
    equals the bare optimizer's after clip_grad_norm_ to the same norm. (This run's noise
    puts the spike bound at 10x the level already: ``clip_within=100`` opens a band.)"""
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), spike=SpikeGuard(clip_within=100.0)
    )
    bare_model = copy.deepcopy(model)
    for step in range(40):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        opt.step()
    bare_model.load_state_dict(model.state_dict())
    guard = opt.spike
    assert guard is not None
    bound, far = guard.bound("grad_norm"), guard.skip_bound("grad_norm")
    assert bound is not None and far is not None and bound < far
    assert far == pytest.approx(100 * guard.level("grad_norm"))  # type: ignore[operator]
    target = (bound + far) / 2  # a spike, and within 100x of the level
    opt.zero_grad()
    opt.observe_loss(backward(model, 40))
    factor = target / float(nn.utils.clip_grad_norm_(model.parameters(), math.inf))
    scale_grads(model, factor)
    opt.step()
    verdict = opt.last_verdict
    assert verdict is not None and verdict.is_accepted and verdict.is_spike_clipped
    assert verdict.clip_threshold is not None and verdict.clip_threshold <= float(np.float32(bound))
    stats = opt.stats()
    assert stats["skipped_steps"] == 0 and stats["spike_clips"] == 1 and stats["total_clips"] == 1
    (event,) = [e for e in opt.events() if e.kind == EventKind.CLIP]
    assert event.step == 41 and event.cause is SkipReason.GRAD_NORM_SPIKE
    assert event.data["z"] > 12 and event.data["clip_threshold"] == verdict.clip_threshold
    # the reference: the same gradients through clip_grad_norm_ to that norm, then bare SGD
    bare = torch.optim.SGD(bare_model.parameters(), lr=0.05)
    bare.zero_grad()
    backward(bare_model, 40)
    scale_grads(bare_model, factor)
    nn.utils.clip_grad_norm_(bare_model.parameters(), verdict.clip_threshold)
    bare.step()
    for p, q in zip(model.parameters(), bare_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_gradient_norm_far_above_its_level_is_skipped_even_with_a_clip_policy() -> None:
    """A x1e5 gradient (the loss ordinary) is no noisy batch: skipped, state bit-identical;
    ``clip_within=math.inf`` clips it instead."""
    for clip_within, skipped in ((10.0, True), (math.inf, False)):
        model = make_model()
        opt = SafeOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05), spike=SpikeGuard(clip_within=clip_within)
        )
        for step in range(40):
            opt.zero_grad()
            opt.observe_loss(backward(model, step))
            opt.step()
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        opt.observe_loss(backward(model, 40))
        scale_grads(model, 1e5)
        opt.step()
        verdict = opt.last_verdict
        assert verdict is not None and verdict.is_accepted is not skipped
        if skipped:
            assert verdict.skip_reason is SkipReason.GRAD_NORM_SPIKE
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        else:
            assert verdict.is_spike_clipped


def test_non_finite_gradients_are_not_spikes() -> None:
    """+Inf has z = +Inf: it must count as a non-finite skip, not feed the spike escalation."""
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for step in range(44):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        if step >= 40:  # 4 consecutive steps: spikes in a row at one level would be relearnt
            set_first_grad(model, math.inf)
        opt.step()
    stats = opt.stats()
    assert stats["skipped_steps"] == 4 and stats["spike_skips"] == 0 and stats["rollbacks"] == 0
    assert stats["new_levels"] == 0
    assert all("NaN/Inf" in e.reason for e in opt.events() if e.kind == "skip")


# ---------------------------------------------------------------------------------
# the guard pays off: poisoned batches and a burst of bad updates


def train(
    task: RegressionTask, faults: dict[int, str], *, spike: Any, clip: Any = None
) -> tuple[float, SafeOptimizer]:
    model = task.make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), clip=clip, spike=spike)
    for step in range(1, 301):
        x, y = task.batch(step)
        if faults.get(step) == "poison":
            y = y * 1e4
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if faults.get(step) == "bad_update":  # the gradient points uphill, 1e3x too long
            scale_grads(model, -1e3)
        elif faults.get(step) == "nan":
            set_first_grad(model, math.nan)
        opt.observe_loss(loss.detach())
        opt.step()
    with torch.no_grad():
        x, y = task.held_out()
        return float(nn.functional.mse_loss(model(x), y)), opt


POISON = dict.fromkeys((80, 150, 220), "poison")
EARLY_POISON = dict.fromkeys((5, 12, 20), "poison")  # before min_history and ZClip's warm-up
# bad updates in short bursts (two in a row: fewer than a new level needs)
BURST = dict.fromkeys((150, 151, 200, 201, 250, 251), "bad_update")


@pytest.mark.parametrize(
    "faults",
    [POISON, BURST, EARLY_POISON],
    ids=["poisoned_batches", "bad_update_burst", "early_poisoned_batches"],
)
def test_the_guard_ends_closer_to_the_clean_run(
    faults: dict[int, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Without clipping (the guard's own job): held-out loss vs. the clean run's.

    With the default ZClip clipping on as well, a clipped poisoned batch is nearly
    harmless on this task (its gradient still points along the targets); the next test
    pins down what the guard does there: exactly an oracle skip.
    """
    caplog.set_level(logging.ERROR, logger="stableopt")
    task = RegressionTask()
    clean, _ = train(task, {}, spike="default")
    guarded, opt = train(task, faults, spike="default")
    unguarded, _ = train(task, faults, spike=None)
    assert opt.stats()["spike_skips"] == len(faults)
    assert abs(guarded - clean) < 0.5 * abs(unguarded - clean), (clean, guarded, unguarded)


@pytest.mark.parametrize("poison", [POISON, EARLY_POISON], ids=["late", "early"])
def test_with_default_clipping_a_spike_skip_is_exactly_an_oracle_skip(
    poison: dict[int, str], caplog: pytest.LogCaptureFixture
) -> None:
    """All defaults: the poisoned batches are skipped, nothing else is; the run is bit for
    bit the run that is told which batches were bad (NaN gradients on exactly those steps).
    Early (steps 5, 12, 20) the clip is still warming up and would not have helped: the
    unguarded run ends about 3x the clean run's held-out loss (measured, 0.41 vs 0.13)."""
    caplog.set_level(logging.ERROR, logger="stableopt")
    task = RegressionTask()
    guarded, opt = train(task, poison, spike="default", clip="zscore")
    oracle, oracle_opt = train(task, dict.fromkeys(poison, "nan"), spike="default", clip="zscore")
    assert guarded == oracle
    stats, oracle_stats = opt.stats(), oracle_opt.stats()
    assert stats["spike_skips"] == 3 and oracle_stats["spike_skips"] == 0
    assert stats["skipped_steps"] == oracle_stats["skipped_steps"] == 3
    assert stats["lr_changes"] == oracle_stats["lr_changes"]


# ---------------------------------------------------------------------------------
# checkpoint and arguments


def test_state_dict_round_trip_continues_identically() -> None:
    steps = [{"loss": as_float32(v)} for v in with_faults(LOSSES, {30: 20.0, 50: math.nan})]
    options: dict[str, Any] = {"window_steps": 16, "min_history": 8, "watch_grad_norm": False}
    options |= {"scale": "linear", "z_threshold": 6.0}  # the tail's spike is far out on it
    guard = SpikeGuard(**options)
    drive_guard(guard, steps[:60])
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    resumed = SpikeGuard(**options)
    resumed.load_state_dict(torch.load(buffer))
    tail = steps[60:] + [{"loss": 50.0}]
    assert drive_guard(resumed, tail) == drive_guard(guard, tail)
    assert drive_guard(resumed, [{"loss": 50.0}]) == [{"loss": True}]
    for key, value in guard.state_dict().items():
        other = resumed.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"window_steps": 7}, ValueError, "window_steps"),
    ({"window_steps": 16.0}, TypeError, "window_steps"),
    ({"window_steps": True}, TypeError, "window_steps"),
    ({"z_threshold": 0}, ValueError, "z_threshold"),
    ({"z_threshold": -1.0}, ValueError, "z_threshold"),
    ({"z_threshold": math.nan}, ValueError, "z_threshold"),
    ({"z_threshold": math.inf}, ValueError, "z_threshold"),
    ({"z_threshold": "6"}, TypeError, "z_threshold"),
    ({"min_history": 2}, ValueError, "min_history"),
    ({"min_history": 200}, ValueError, "min_history"),
    ({"min_history": 3.5}, TypeError, "min_history"),
    ({"watch_loss": 1}, TypeError, "watch_loss"),
    ({"watch_grad_norm": "yes"}, TypeError, "watch_grad_norm"),
    ({"watch_loss": False, "watch_grad_norm": False}, ValueError, "watch_loss"),
    ({"scale": "logarithmic"}, ValueError, "scale must be one of"),
    ({"early_ratio": 1.0}, ValueError, "early_ratio"),
    ({"early_ratio": 0.5}, ValueError, "early_ratio"),
    ({"early_ratio": -100.0}, ValueError, "early_ratio"),
    ({"early_ratio": math.nan}, ValueError, "early_ratio"),
    ({"early_ratio": math.inf}, ValueError, "early_ratio"),
    ({"early_ratio": "100"}, TypeError, "early_ratio"),
    ({"early_ratio": True}, TypeError, "early_ratio"),
]


@pytest.mark.parametrize(
    "kwargs, error, name", BAD_ARGUMENTS, ids=[str(k) for k, _, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        SpikeGuard(**kwargs)


def test_defaults_and_repr() -> None:
    guard = SpikeGuard()
    assert (guard.window_steps, guard.z_threshold, guard.min_history) == (128, 12.0, 32)
    assert guard.scale == "auto"
    assert guard.watch_loss and guard.watch_grad_norm
    assert guard.early_ratio == 100.0
    assert "window_steps=128" in repr(guard) and "early_ratio=100.0" in repr(guard)
    assert "early_ratio=None" in repr(SpikeGuard(early_ratio=None))
    assert SpikeGuard(early_ratio=2).early_ratio == 2.0


def test_the_windows_mad_equals_a_sorted_reference() -> None:
    """The O(log n) MAD selection against sorting every deviation (numpy), windows with ties."""
    from stableopt.stages._window import lower_median_deviation

    rng = np.random.default_rng(7)
    for _ in range(2000):
        n = int(rng.integers(1, 60))
        values = np.where(rng.random(n) < 0.3, rng.integers(0, 4, n), rng.random(n))
        ordered = sorted(float(v) for v in values)
        k = (n - 1) // 2
        expected = _lower_median(np.abs(np.asarray(ordered) - ordered[k]))
        assert lower_median_deviation(ordered, k) == expected
