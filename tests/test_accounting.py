"""Honest accounting: ``opt.last_step`` and ``opt.step_was_skipped`` say what each step did,
and accelerate (its own loop, and through it the Hugging Face Trainer) sees our skips.

Checked against the weights themselves (bit-identical after a skip, equal to the snapshot
after a rollback), against ``clip_grad_norm_`` for the coefficient, and against real
accelerate objects on CPU.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import torch
from torch import nn

from stableopt import DivergenceError, Escalation, SafeLoss, SafeOptimizer, SkipReason, StepOutcome

pytestmark = pytest.mark.usefixtures("decide_on")


def model_and_opt(**options: Any) -> tuple[nn.Module, SafeOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), **options)


def one_step(model: nn.Module, opt: SafeOptimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.observe_loss(loss)
    opt.step()


def test_each_outcome_is_reported_with_its_reason() -> None:
    model, opt = model_and_opt(clip=0.05)
    assert opt.last_step is None and opt.step_was_skipped is False
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)

    # updated, clipped: the coefficient is clip_grad_norm_'s max_norm / norm
    twin = copy.deepcopy(model)
    nn.functional.mse_loss(twin(x), y).backward()
    norm = float(nn.utils.clip_grad_norm_(twin.parameters(), math.inf))
    one_step(model, opt, x, y)
    outcome = opt.last_step
    assert isinstance(outcome, StepOutcome) and outcome.status == "updated"
    assert outcome.step == 1 and outcome.reason is None and not opt.step_was_skipped
    assert outcome.is_clipped and outcome.clip_coefficient == pytest.approx(0.05 / norm, rel=1e-5)

    # skipped: a NaN gradient; the weights are bit-identical
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = math.nan  # type: ignore[index]
    opt.step()
    outcome = opt.last_step
    assert outcome is not None and outcome.status == "skipped" and opt.step_was_skipped
    assert outcome.skip_reason is SkipReason.NONFINITE_GRADS
    assert outcome.reason is not None and "NaN/Inf in the gradients" in outcome.reason
    assert outcome.clip_coefficient == 1.0 and not outcome.is_clipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    # healthy again
    one_step(model, opt, x, y)
    assert opt.last_step is not None and opt.last_step.status == "updated"
    assert not opt.step_was_skipped


def test_a_rollback_is_reported_and_the_weights_are_the_snapshot() -> None:
    model, opt = model_and_opt(clip=None)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    one_step(model, opt, x, y)
    assert opt.rollback is not None and opt.rollback.snapshot_step == 0
    weight = next(model.parameters())
    # an update that writes NaN into one weight: a forward pre-hook of the next step would
    # see it; here the inner optimizer's post-hook writes it during the update
    handle = opt.optimizer.register_step_post_hook(
        lambda o, a, k: weight.data.view(-1)[0].fill_(math.nan)
    )
    one_step(model, opt, x, y)
    handle.remove()
    outcome = opt.last_step
    assert outcome is not None and outcome.status == "rolled_back" and opt.step_was_skipped
    assert outcome.reason is not None and "the update left non-finite weights" in outcome.reason
    assert torch.isfinite(weight).all()
    # one corrupting update: restored, the LR left alone (a second within 20 steps cuts)
    assert outcome.lr_factor == opt.lr_factor == 1.0


def test_a_stop_is_reported_before_the_error_reaches_the_loop() -> None:
    model, opt = model_and_opt(escalation=Escalation(max_consecutive_failures=2))
    x, y = torch.randn(8, 4), torch.full((8, 1), math.nan)
    one_step(model, opt, x, y)
    assert opt.last_step is not None and opt.last_step.status == "skipped"
    with pytest.raises(DivergenceError):
        one_step(model, opt, x, y)
    assert opt.last_step is not None and opt.last_step.status == "stopped"
    assert opt.last_step.step == 2 and opt.step_was_skipped


# -- accelerate ---------------------------------------------------------------------------


def test_accelerate_sees_our_skips_and_safeloss_takes_its_wrapper() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(safe, lambda s: 1.0 / (1 + s))
    model, opt, scheduler = accelerator.prepare(model, safe, scheduler)
    assert type(opt).__name__ == "AcceleratedOptimizer" and opt.optimizer is safe
    loss_fn = SafeLoss(nn.MSELoss(), optimizer=opt)  # the wrapper, as a new user passes it
    assert loss_fn.optimizer is safe
    skipped, epochs = [], []
    g = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        if step == 3:
            x[0, 0] = math.nan  # a bad batch: NaN loss and gradients
        loss = loss_fn(model(x), y)
        accelerator.backward(loss)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        skipped.append(accelerator.optimizer_step_was_skipped)
        epochs.append(scheduler.scheduler.last_epoch)
    assert skipped == [False, False, True, False, False, False]
    assert safe.stats()["skipped_steps"] == 1 and safe.stats()["loss"] is not None
    # accelerate's scheduler does not step after a skipped optimizer step (as after
    # GradScaler's own skip): the schedule counts the updates that ran
    assert epochs == [1, 2, 2, 3, 4, 5]


def test_a_plain_optimizer_is_still_refused_by_safeloss() -> None:
    plain = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="wrap it first"):
        SafeLoss(nn.MSELoss(), optimizer=plain)  # type: ignore[arg-type]
