"""Mixed precision: GradScaler drives SafeOptimizer; bf16 autocast trains under it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stableopt import SafeOptimizer, SkipReason
from tests.helpers import batch, make_model, twin

# Every test runs with the step decided on the host and on the device (conftest.py).
pytestmark = pytest.mark.usefixtures("decide_on")

STEPS = 25


def scaled_backward(
    model: nn.Module, scaler: torch.amp.GradScaler, step: int, poison: bool = False
) -> None:
    x, y = batch(step)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    if poison:
        next(model.parameters()).grad.view(-1)[0] = float("inf")


def make_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_gradscaler_without_clip_is_bit_identical_to_bare(fused: bool) -> None:
    model = make_model()
    reference = twin(model)
    impl = {"fused": True} if fused else {"foreach": True}
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, **impl), clip=None)
    bare = torch.optim.AdamW(reference.parameters(), lr=1e-2, **impl)
    assert safe._step_supports_amp_scaling is fused
    scalers = [make_scaler(), make_scaler()]
    for step in range(STEPS):
        for m, opt, scaler in ((model, safe, scalers[0]), (reference, bare, scalers[1])):
            opt.zero_grad()
            scaled_backward(m, scaler, step, poison=step == 7)
            scaler.step(opt)
            scaler.update()
        if fused and step in (6, 7):  # the fused kernel's found_inf skip is reported too
            assert safe.last_step is not None and safe.step_was_skipped is (step == 7)
            if step == 7:
                assert safe.last_step.skip_reason is SkipReason.AMP_OVERFLOW
                assert safe.last_step.cause is SkipReason.AMP_OVERFLOW
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters())), (
            step
        )
    stats = safe.stats()
    # the scaler's own overflow skip is not a failure of ours: no skip, no LR cut
    assert stats["skipped_steps"] == 0 and stats["lr_changes"] == 0
    assert stats["scaler_skips"] == (1 if fused else 0)  # unfused: GradScaler never calls step()
    assert stats["steps"] == (STEPS if fused else STEPS - 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_gradscaler_clip_sees_unscaled_gradients_once(fused: bool, decide_on: str) -> None:
    """Reference: scaler.unscale_(opt); clip_grad_norm_(params, c); scaler.step(opt).

    Bit for bit where the step multiplies the gradients by the coefficient (every case
    but a fused optimizer deciding on the device). There the coefficient rides in the
    kernel's grad_scale, which divides by fl32(1/c): each step, from the same weights
    and state, is within a few float32 ulp of the reference's weight or update
    (docs/clipping.md).
    """
    model = make_model()
    reference = twin(model)
    impl = {"fused": True} if fused else {"foreach": True}
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, **impl), clip=0.05)
    bare = torch.optim.AdamW(reference.parameters(), lr=1e-2, **impl)
    scalers = [make_scaler(), make_scaler()]
    exact = not (fused and decide_on == "device")
    for step in range(STEPS):
        safe.zero_grad()
        scaled_backward(model, scalers[0], step)
        scalers[0].step(safe)
        scalers[0].update()
        bare.zero_grad()
        scaled_backward(reference, scalers[1], step)
        scalers[1].unscale_(bare)
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        scalers[1].step(bare)
        scalers[1].update()
        assert safe.stats()["grad_norm"] == float(norm)
        for p, q in zip(model.parameters(), reference.parameters()):
            if exact:
                assert torch.equal(p, q)
            else:
                # a few ulp of the weight, or of the update (about lr) where the weight is small
                torch.testing.assert_close(p, q, rtol=4 * 2.0**-23, atol=4 * 2.0**-23 * 1e-2)
        if not exact:  # from the same weights and state again: the error of one step only
            reference.load_state_dict(model.state_dict())
            bare.load_state_dict(copy.deepcopy(safe.optimizer.state_dict()))
    assert safe.stats()["total_clips"] > 0


def test_user_unscale_before_step_is_not_unscaled_twice() -> None:
    model = make_model()
    reference = twin(model)
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), clip=None)
    bare = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    scalers = [make_scaler(), make_scaler()]
    for step in range(10):
        for m, opt, scaler in ((model, safe, scalers[0]), (reference, bare, scalers[1])):
            opt.zero_grad()
            scaled_backward(m, scaler, step)
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_trains_and_skips_nan() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    first = None
    for step in range(40):
        x, y = batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        if step == 20:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == 20:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        first = first if first is not None else float(loss)
    assert opt.stats()["skipped_steps"] == 1
    assert float(loss) < first
    assert all(torch.isfinite(p).all() for p in model.parameters())
