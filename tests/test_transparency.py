"""Transparent when healthy: SafeOptimizer(X) equals X, and with a fixed clip X + clip_grad_norm_."""

from __future__ import annotations

import math

import pytest
import torch

from stableopt import SafeOptimizer
from tests.helpers import OPTIMIZERS, OptimizerInfo, backward, make_model, twin

STEPS = 40


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
def test_no_clip_is_bit_identical_to_bare_optimizer(info: OptimizerInfo) -> None:
    model = make_model()
    reference = twin(model)
    safe = SafeOptimizer(info.build(model.parameters()), clip=None)
    bare = info.build(reference.parameters())
    for step in range(STEPS):
        for m, opt in ((model, safe), (reference, bare)):
            opt.zero_grad()
            backward(m, step)
            opt.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q), f"step {step}: parameters differ from bare {info.name}"
    for p, q in zip(model.parameters(), reference.parameters()):
        for key, value in bare.state[q].items():
            assert torch.equal(torch.as_tensor(safe.state[p][key]), torch.as_tensor(value))
    assert safe.stats()["good_steps"] == STEPS


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("max_norm", [0.05, 1.0])
def test_fixed_clip_matches_clip_grad_norm(info: OptimizerInfo, max_norm: float) -> None:
    model = make_model(1)
    reference = twin(model)
    safe = SafeOptimizer(info.build(model.parameters()), clip=max_norm)
    bare = info.build(reference.parameters())
    clipped_steps = 0
    for step in range(STEPS):
        safe.zero_grad()
        backward(model, step)
        safe.step()
        bare.zero_grad()
        backward(reference, step)
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        clipped_steps += int(norm > max_norm)
        bare.step()
        assert safe.stats()["grad_norm"] == float(norm)
        for p, q in zip(model.parameters(), reference.parameters()):
            # fused ones too: decided before the update, the gradients are multiplied by
            # the coefficient, as clip_grad_norm_ does (docs/concepts.md#transparency)
            assert torch.equal(p, q), f"step {step}: differs from {info.name} + clip_grad_norm_"
    assert safe.stats()["total_clips"] == clipped_steps
    if max_norm == 0.05:
        assert clipped_steps > 0


def test_fixed_clip_reports_threshold() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip=0.5)
    backward(model, 0)
    opt.step()
    assert opt.stats()["clip_threshold"] == pytest.approx(0.5)
    # the default clips outliers only: nothing is known to be one before a step
    fresh = SafeOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1))
    assert fresh.stats()["clip_threshold"] == math.inf
    off = SafeOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), clip=None)
    assert off.stats()["clip_threshold"] is None
