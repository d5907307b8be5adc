"""The two ways to a step's verdict agree: decided in floats on the host (CPU gradients)
and in kernels on the device (the accelerator path, forced on CPU tensors here).

Every stage, every fault kind: the same skips, clips, spikes, LR cuts, rollbacks and
events, step by step, and the same weights up to the clip coefficient's rounding
(the host path computes the threshold in float64, the device path in the norm's dtype).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from stableopt import EmergencyClip, EmergencyLR, PlateauLR, SafeOptimizer, SpikeGuard
from stableopt.optimizer import SafeOptimizer as _Safe
from tests.helpers import backward, make_model

# step -> fault: NaN gradients, an Inf loss, a 1e4x gradient (clipped, emergency),
# a run of loss spikes at one level (three skips, then a new level), a norm above
# skip_above, an update that writes NaN into a weight (rollback, LR cut).
# (The spike guard watches the loss only, so the big gradients reach the clip.)
FAULTS = {
    30: "nan_grad",
    45: "inf_loss",
    60: "big_grad",
    61: "big_grad",
    80: "loss_spike",
    81: "loss_spike",
    82: "loss_spike",
    83: "loss_spike",
    84: "loss_spike",
    85: "loss_spike",
    100: "garbage",
    110: "nan_weights",
}
STEPS = 130

INNER = {
    "AdamW-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "SGD-forloop": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=False),
}


def _run(inner: str, clip: str, on_host: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(_Safe, "_cpu_reads_decide", on_host)
    model = make_model()
    opt = SafeOptimizer(
        INNER[inner](model.parameters()),
        clip=clip,
        emergency_clip=EmergencyClip(threshold=50.0, skip_above=1e6),
        spike=SpikeGuard(window_steps=32, min_history=16, z_threshold=6.0, watch_grad_norm=False),
        plateau=PlateauLR(patience_steps=20, check_every_steps=5, threshold=0.5),
        emergency_lr=EmergencyLR(weight_faults=1),  # the corrupting update cuts: one more path
        check_weights="every_step",
    )

    def corrupt(optimizer: Any, args: Any, kwargs: Any) -> None:
        if FAULTS.get(opt.monitor.counters["steps"] - 1) == "nan_weights":
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan

    opt.optimizer.register_step_post_hook(corrupt)
    verdicts = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = backward(model, step)
        fault = FAULTS.get(step)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if fault == "nan_grad":
            grads[0].view(-1)[0] = math.nan
        elif fault == "big_grad":
            for g in grads:
                g.mul_(1e4)
        elif fault == "garbage":
            for g in grads:
                g.mul_(1e9)
        observed = {"inf_loss": math.inf, "loss_spike": 1e3 * float(loss)}.get(fault or "", loss)
        opt.observe_loss(observed)
        opt.step()
        stats = opt.stats()
        verdicts.append(
            (stats["good_steps"], stats["skipped_steps"], stats["total_clips"], stats["lr_factor"])
        )
    return {
        "verdicts": verdicts,
        "counters": dict(opt.monitor.counters),
        "events": [(e.step, e.kind) for e in opt.events()],
        "weights": [p.detach().clone() for p in model.parameters()],
    }


@pytest.mark.parametrize("clip", ["zscore", "percentile", "agc"])
@pytest.mark.parametrize("inner", list(INNER))
def test_host_and_device_decide_alike(
    inner: str, clip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _run(inner, clip, True, monkeypatch)
    device = _run(inner, clip, False, monkeypatch)
    assert host["verdicts"] == device["verdicts"]
    assert host["counters"] == device["counters"]
    assert host["events"] == device["events"]
    for a, b in zip(host["weights"], device["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the run exercised what it is meant to: skips, clips, an emergency, a rollback
    counters = host["counters"]
    assert counters["skipped_steps"] >= 6 and counters["total_clips"] >= 2
    assert counters["emergency_clips"] >= 1 and counters["rollbacks"] >= 1
    assert counters["new_levels"] == 1
    assert any(kind == "lr_cut" for _, kind in host["events"])


def test_only_a_fused_optimizer_off_the_cpu_decides_on_the_device() -> None:
    model = nn.Linear(4, 2)
    grads = [torch.zeros(2, 4), torch.zeros(2)]
    meta = [torch.zeros(2, 4, device="meta"), torch.zeros(2, device="meta")]
    plain = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    # a non-fused update waits for the verdict: read first, wherever the gradients are
    assert plain._decides_before_update(grads) and plain._decides_before_update(meta)
    fused = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True))
    assert fused._decides_before_update(meta)  # no state yet: a skip must leave it empty
    backward_linear(model)
    fused.step()
    assert len(fused.optimizer.state) == 2
    assert fused._decides_before_update(grads)  # reading a CPU number is not a sync
    assert not fused._decides_before_update(meta)  # elsewhere: found_inf, read after


def backward_linear(model: nn.Module) -> None:
    model(torch.randn(3, 4)).square().mean().backward()
